# Sourced by scripts/*: installs Debian packages only when something is missing, with a
# single `apt-get update` per machine run. Safe to call many times.

ensure_packages() {
    local missing=()
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if [ ! -e /tmp/.ferrydisk-apt-updated ]; then
        echo "==> apt-get update" >&2
        $sudo apt-get update -qq >&2 && touch /tmp/.ferrydisk-apt-updated
    fi
    echo "==> installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# What the end-to-end tests and the demo run: qemu-img/qemu-io as the oracle, curl, the
# compressors that make fixtures, losetup for the block-device test, python3 for the
# test HTTP server; the CNCF registry, buildah, skopeo, htpasswd and openssl for the
# registry tests; busybox-static is the `sh`/`cp` the importer image ships (the
# Containerfile test builds the images from the host's static binaries).
TEST_PACKAGES=(qemu-utils curl python3 gzip xz-utils zstd bzip2 tar util-linux time
    docker-registry buildah skopeo umoci apache2-utils openssl busybox-static)

# The manifest test's validators: yamllint (Debian) and kubernetes-validate (PyPI,
# ships the Kubernetes JSON schemas, so it needs no cluster and no network at run time).
# An entry is a pip spec, or MODULE=SPEC when the module to check for differs.
ensure_python_packages() {
    local p mod spec
    for p in "$@"; do
        mod=${p%%=*}; spec=${p#*=}
        python3 -c "import ${mod//-/_}" 2>/dev/null && continue
        echo "==> pip install $spec" >&2
        python3 -m pip install -q "$spec" >&2 2>/dev/null || python3 -m pip install -q --break-system-packages "$spec" >&2
    done
}
TEST_PACKAGES+=(yamllint python3-pip)
# The S3 tests' server: moto's standalone S3 server (flask_cors is only there with the
# [server] extra; boto3 and cryptography come with it, the GCS stand-in uses the latter).
# The imageio tests' data server: the real ovirt-imageio daemon, whose sdist builds a C
# extension (a compiler and Python's headers), serving raw disks through qemu-nbd.
TEST_PYTHON_PACKAGES=(kubernetes-validate "flask_cors=moto[server]" "ovirt_imageio=ovirt-imageio==2.5.1" "tusclient=tuspy")
TEST_PACKAGES+=(gcc python3-dev)
