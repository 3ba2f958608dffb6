#!/usr/bin/env python3
"""Images crafted to make a streaming importer's memory grow (issue 11, section 2).

Usage: memimages.py DIR. Writes into DIR the images the memory test imports; each is
built from qemu-img/qemu-io output, patched where qemu cannot produce the layout:

  qcow2-tables-first.qcow2   256 MiB of 512-byte clusters, every L2 table before the data
  qcow2-far-l2.qcow2         an L2 entry pointing 1 TiB past the end of the file
  qcow2-prealloc-full.qcow2  preallocation=full: data ahead of nothing, held then spooled
  vmdk-8m-grains.vmdk        streamOptimized, 8 MiB grains (the most we take), 64 MiB
  vmdk-huge-grains.vmdk      a header claiming 64 MiB grains
  vhd-512b-blocks.vhd        dynamic vhd, 128 MiB in 512-byte blocks stored in reverse order
  vmdk-1-sector-grains.vmdk  monolithicSparse, 64 MiB in 1-sector grains, reverse order
  qcow2-junk-first.qcow2     1 GiB of unreferenced 512-byte clusters before the L1 table
                             (held, then spooled to scratch: issue 27's index of runs)
  pax-header.tar             a 256 MiB PAX record before a small disk
  gnu-longname.tar           a 256 MiB GNU long name before a small disk
Files ending in .gz are the same through gzip -1 (unknown length to the importer).
"""
import io
import os
import struct
import subprocess
import sys
import tarfile
import zlib

d = sys.argv[1]
os.makedirs(d, exist_ok=True)


def run(*a, **kw):
    subprocess.run(a, check=True, **kw)


def p(name):
    return os.path.join(d, name)


# qcow2, 512-byte clusters, every L2 table allocated before the data: one small write
# per L2 table's range first, then everything.
run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p("qcow2-tables-first.qcow2"), "256M")
cmds = "".join("write -q -P 0x5 %d 512\n" % k for k in range(0, 256 << 20, 32768))
cmds += "write -q -P 0xab 0 256M\n"
run("qemu-io", "-f", "qcow2", p("qcow2-tables-first.qcow2"), input=cmds.encode(), stdout=subprocess.DEVNULL)

# A small qcow2 whose first L2 entry is moved 1 TiB ahead.
run("qemu-img", "create", "-q", "-f", "qcow2", p("qcow2-far-l2.qcow2"), "64M")
run("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x11 0 4M", p("qcow2-far-l2.qcow2"), stdout=subprocess.DEVNULL)
with open(p("qcow2-far-l2.qcow2"), "r+b") as f:
    h = f.read(104)
    l1_off = struct.unpack(">Q", h[40:48])[0]
    f.seek(l1_off)
    l2_off = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    f.seek(l2_off)
    f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))

run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", p("qcow2-prealloc-full.qcow2"), "96M")
run("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x22 8M 8M", p("qcow2-prealloc-full.qcow2"), stdout=subprocess.DEVNULL)


def junk_first(src, dst, junk):
    """`src` (a qcow2 of 512-byte clusters) with `junk` bytes of clusters nothing
    references inserted after its header: every offset past the header moves by `junk`."""
    with open(src, "rb") as f:
        data = bytearray(f.read())
    cs = 1 << struct.unpack(">I", data[20:24])[0]
    l1_size, l1_off, rt_off, rt_clusters = struct.unpack(">IQQI", data[36:60])
    mask = 0x00FFFFFFFFFFFE00

    def shift_table(off, n):
        for i in range(n):
            e = struct.unpack(">Q", data[off + 8 * i:off + 8 * i + 8])[0]
            if e & mask:
                data[off + 8 * i:off + 8 * i + 8] = struct.pack(">Q", e + junk)

    for i in range(l1_size):
        e = struct.unpack(">Q", data[l1_off + 8 * i:l1_off + 8 * i + 8])[0]
        if e & mask:
            shift_table(e & mask, cs // 8)
    shift_table(l1_off, l1_size)
    shift_table(rt_off, rt_clusters * cs // 8)
    struct.pack_into(">Q", data, 40, l1_off + junk)
    struct.pack_into(">Q", data, 48, rt_off + junk)
    with open(dst, "wb") as f:
        f.write(data[:cs])
        f.seek(cs + junk)
        f.write(data[cs:])


run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p("small-512.qcow2"), "4M")
run("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x33 64K 1M", p("small-512.qcow2"), stdout=subprocess.DEVNULL)
junk_first(p("small-512.qcow2"), p("qcow2-junk-first.qcow2"), 1 << 30)
os.remove(p("small-512.qcow2"))


def stream_optimized(path, grain_sectors, capacity_sectors, fill):
    """A streamOptimized vmdk written marker by marker (qemu-img only writes 64 KiB grains)."""
    hdr = bytearray(512)
    hdr[0:4] = b"KDMV"
    struct.pack_into("<IIQQQQIQQQB", hdr, 4, 3, 1 | (1 << 16) | (1 << 17), capacity_sectors,
                     grain_sectors, 0, 0, 512, 0, (1 << 64) - 1, 1, 0)
    hdr[73:77] = b"\n \r\n"
    struct.pack_into("<H", hdr, 77, 1)
    gb = grain_sectors * 512
    with open(path, "wb") as f:
        f.write(hdr)
        for lba in range(0, capacity_sectors, grain_sectors):
            data = zlib.compress(bytes([fill(lba)]) * gb, 1)
            rec = struct.pack("<QI", lba, len(data)) + data
            f.write(rec + b"\0" * (-len(rec) % 512))
        f.write(struct.pack("<QII", 0, 0, 0) + b"\0" * 496)  # end of stream


stream_optimized(p("vmdk-8m-grains.vmdk"), 16384, 131072, lambda lba: 1 + (lba // 16384) % 200)
stream_optimized(p("vmdk-huge-grains.vmdk"), 131072, 131072, lambda lba: 7)


def vhd_checksum(b):
    return (~sum(b) & 0xFFFFFFFF)


def fragmented_vhd(path, size, block):
    """A dynamic vhd whose blocks are stored last guest block first: no two runs merge."""
    blocks = size // block
    bat_off = 1536
    bat_len = (blocks * 4 + 511) // 512 * 512
    # qemu's vpc driver: (block / 4096 + 511) & ~511, so 0 for blocks under 4 KiB.
    bitmap = (block // 4096 + 511) & ~511
    first_block = bat_off + bat_len
    footer = bytearray(512)
    footer[0:8] = b"conectix"
    struct.pack_into(">IIQI4sIIQQHBBI", footer, 8, 2, 0x00010000, 512, 0, b"qem2", 0x00050003, 0x5769326B,
                     size, size, 65535, 16, 255, 3)
    struct.pack_into(">I", footer, 64, vhd_checksum(footer))
    dyn = bytearray(1024)
    dyn[0:8] = b"cxsparse"
    struct.pack_into(">QQIII", dyn, 8, (1 << 64) - 1, bat_off, 0x00010000, blocks, block)
    struct.pack_into(">I", dyn, 36, vhd_checksum(dyn))
    bat = bytearray(bat_len)
    for i in range(blocks):
        host = first_block + (blocks - 1 - i) * (bitmap + block)
        struct.pack_into(">I", bat, i * 4, host // 512)
    with open(path, "wb") as f:
        f.write(footer)
        f.write(dyn)
        f.write(bat)
        chunk = bytearray()
        for j in range(blocks):
            i = blocks - 1 - j
            chunk += b"\xff" * bitmap + bytes([1 + i % 251]) * block
            if len(chunk) >= 8 << 20:
                f.write(chunk)
                chunk = bytearray()
        f.write(chunk)
        f.write(footer)


fragmented_vhd(p("vhd-512b-blocks.vhd"), 128 << 20, 512)


def fragmented_vmdk(path, size):
    """monolithicSparse with 1-sector grains, the last guest grain stored first."""
    grains = size // 512
    gtes = 512
    gts = (grains + gtes - 1) // gtes
    desc = ('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
            'createType="monolithicSparse"\nRW %d SPARSE "x.vmdk"\n' % grains).encode()
    desc_sectors = (len(desc) + 511) // 512
    gd_sector = 1 + desc_sectors
    gd_sectors = (gts * 4 + 511) // 512
    gt_sector = gd_sector + gd_sectors
    gt_sectors = gts * gtes * 4 // 512
    first_grain = gt_sector + gt_sectors
    hdr = bytearray(512)
    hdr[0:4] = b"KDMV"
    struct.pack_into("<IIQQQQIQQQ", hdr, 4, 1, 1, grains, 1, 1, desc_sectors, gtes, 0, gd_sector,
                     first_grain)
    hdr[73:77] = b"\n \r\n"
    gd = bytearray(gd_sectors * 512)
    for t in range(gts):
        struct.pack_into("<I", gd, t * 4, gt_sector + t * (gtes * 4 // 512))
    gt = bytearray(gt_sectors * 512)
    for g in range(grains):
        struct.pack_into("<I", gt, g * 4, first_grain + (grains - 1 - g))
    with open(path, "wb") as f:
        f.write(hdr)
        f.write(desc + b"\0" * (desc_sectors * 512 - len(desc)))
        f.write(gd)
        f.write(gt)
        chunk = bytearray()
        for j in range(grains):
            g = grains - 1 - j
            chunk += bytes([1 + g % 253]) * 512
            if len(chunk) >= 8 << 20:
                f.write(chunk)
                chunk = bytearray()
        f.write(chunk)


fragmented_vmdk(p("vmdk-1-sector-grains.vmdk"), 64 << 20)


def big_header_tar(path, kind, n):
    fmt = tarfile.PAX_FORMAT if kind == "pax" else tarfile.GNU_FORMAT
    with tarfile.open(path, "w", format=fmt) as t:
        info = tarfile.TarInfo("disk.img" if kind == "pax" else "d/" + "x" * n)
        data = b"\xab" * 4096
        info.size = len(data)
        if kind == "pax":
            info.pax_headers = {"comment": "y" * n}
        t.addfile(info, io.BytesIO(data))


big_header_tar(p("pax-header.tar"), "pax", 256 << 20)
big_header_tar(p("gnu-longname.tar"), "gnu", 256 << 20)

for name in ["qcow2-tables-first.qcow2", "qcow2-far-l2.qcow2", "qcow2-junk-first.qcow2",
             "pax-header.tar", "gnu-longname.tar"]:
    with open(p(name), "rb") as src, open(p(name + ".gz"), "wb") as out:
        run("gzip", "-1", "-c", stdin=src, stdout=out)
