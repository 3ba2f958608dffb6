//! Layered qcow2 images (virter's stacks of overlays, each layer a qcow2 whose backing
//! file is the layer below), flattened top-down in one streaming pass per layer.
//!
//! The top layer is converted first. Every guest cluster a layer decides (data, a zero
//! cluster, a compressed cluster) is claimed in a bitmap. A lower layer writes only
//! clusters no layer above claimed, so the top layer's allocated clusters win and lower
//! layers fill what is unallocated above them. Memory is the bitmap, one bit per
//! cluster of the virtual disk, never data. Backing names are returned to the caller,
//! which resolves them inside the image only.

use super::header::{Header, Qcow2Error};
use std::sync::Mutex;

/// The bitmap may not grow past this (1 TiB of 64 KiB clusters needs 2 MiB).
pub const MAX_BITMAP_BYTES: u64 = 64 << 20;

#[derive(Debug, Default)]
pub struct Stack {
    inner: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The layer below the stack is an existing disk (a delta applied onto the disk a
    /// previous stage wrote): a zero cluster a layer decides must be written as zeros,
    /// since what lies below does not read as zeros.
    overlay: bool,
    cluster_bits: u32,
    virtual_size: u64,
    claimed: Vec<u64>,
    layers: usize,
    backing: Option<String>,
}

impl Stack {
    /// A stack over an existing disk: its layers decide clusters of a disk that already
    /// holds data (a warm migration's delta). Unallocated clusters leave the disk as it
    /// is; zero clusters zero it.
    pub fn overlay() -> Self {
        Stack {
            inner: Mutex::new(State {
                overlay: true,
                ..State::default()
            }),
        }
    }

    /// Whether the stack lies over an existing disk ([`Stack::overlay`]).
    pub fn is_overlay(&self) -> bool {
        self.inner.lock().expect("layer stack").overlay
    }

    /// A layer's header, before its tables are read. Returns whether it is the top
    /// layer (the first one begun), which alone sizes and prepares the disk.
    pub fn begin(&self, h: &Header, backing: Option<String>) -> Result<bool, Qcow2Error> {
        let mut st = self.inner.lock().expect("layer stack");
        if h.extended_l2 {
            return Err(Qcow2Error::Layered(
                "a layer with extended L2 entries (subclusters) cannot be flattened here".into(),
            ));
        }
        let top = st.layers == 0;
        if top {
            let clusters = h.virtual_size.div_ceil(h.cluster_size());
            let bytes = clusters.div_ceil(64) * 8;
            if bytes > MAX_BITMAP_BYTES {
                return Err(Qcow2Error::Layered(format!(
                    "{clusters} clusters of {} bytes need a {bytes}-byte allocation bitmap, more than {MAX_BITMAP_BYTES}",
                    h.cluster_size()
                )));
            }
            st.cluster_bits = h.cluster_bits;
            st.virtual_size = h.virtual_size;
            st.claimed = vec![0; (bytes / 8) as usize];
        } else {
            if h.cluster_bits != st.cluster_bits {
                return Err(Qcow2Error::Layered(format!(
                    "layer {} has {}-byte clusters, the layer above {}",
                    st.layers,
                    h.cluster_size(),
                    1u64 << st.cluster_bits
                )));
            }
            if h.virtual_size > st.virtual_size {
                return Err(Qcow2Error::Layered(format!(
                    "layer {} ({} bytes) is larger than the image ({} bytes)",
                    st.layers, h.virtual_size, st.virtual_size
                )));
            }
        }
        st.layers += 1;
        st.backing = backing;
        Ok(top)
    }

    /// Claims the guest cluster at `guest` for the layer being converted: true when
    /// no layer above decided it (the layer's data goes to the disk).
    pub fn claim(&self, guest: u64) -> bool {
        let mut st = self.inner.lock().expect("layer stack");
        let c = guest >> st.cluster_bits;
        let (w, b) = ((c / 64) as usize, c % 64);
        match st.claimed.get_mut(w) {
            Some(word) if *word & (1 << b) == 0 => {
                *word |= 1 << b;
                true
            }
            _ => false,
        }
    }

    /// The top layer's virtual size: the disk's.
    pub fn virtual_size(&self) -> u64 {
        self.inner.lock().expect("layer stack").virtual_size
    }

    /// The backing file the layer begun last names, if any.
    pub fn backing(&self) -> Option<String> {
        self.inner.lock().expect("layer stack").backing.clone()
    }

    /// Layers begun so far.
    pub fn layers(&self) -> usize {
        self.inner.lock().expect("layer stack").layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::qcow2::header::tests::header_v3;

    #[test]
    fn upper_layers_win_and_mismatched_layers_are_refused() {
        let top = Header::parse(&header_v3(1 << 30)).expect("top");
        let stack = Stack::default();
        assert!(stack
            .begin(&top, Some("./virter:layer:sha256:x".into()))
            .expect("top"));
        assert!(stack.claim(0));
        assert!(!stack.claim(0), "a cluster is claimed once");
        assert!(stack.claim(5 << 16));
        assert!(!stack.claim(1 << 30), "outside the disk: never written");
        let lower = Header::parse(&header_v3(1 << 20)).expect("lower");
        assert!(!stack.begin(&lower, None).expect("lower"), "not the top");
        assert_eq!(stack.backing(), None);
        assert!(!stack.claim(5 << 16), "decided above");
        assert!(stack.claim(6 << 16));
        assert_eq!((stack.layers(), stack.virtual_size()), (2, 1 << 30));
        let larger = Header::parse(&header_v3(2 << 30)).expect("larger");
        assert!(matches!(
            stack.begin(&larger, None),
            Err(Qcow2Error::Layered(_))
        ));
        let mut c = header_v3(1 << 20);
        c[20..24].copy_from_slice(&17u32.to_be_bytes());
        c[40..48].copy_from_slice(&(3u64 << 17).to_be_bytes()); // L1, cluster-aligned
        c[48..56].copy_from_slice(&(1u64 << 17).to_be_bytes()); // refcount table
        c.resize(1 << 17, 0);
        let other_cs = Header::parse(&c).expect("128 KiB clusters");
        assert!(matches!(
            stack.begin(&other_cs, None),
            Err(Qcow2Error::Layered(_))
        ));
    }
}
