//! Clusters the stream has not reached yet, waiting for it: L2 tables an L1 names, data
//! clusters an L2 table names. Kept as runs (consecutive host clusters mapping
//! consecutive guest ranges), so the bookkeeping of an image whose tables all come
//! before its data (qemu's `preallocation=metadata`, small clusters) is a few entries
//! per guest extent, not one per cluster: a 1 GiB image of 512-byte clusters used to
//! cost 2 million map entries. A host cluster that a run already covers (a cluster two
//! guest ranges share) is kept beside the runs. Every entry counts against
//! [`MAX_ENTRIES`]; a layout that needs more is refused instead of growing memory.

use std::collections::BTreeMap;

/// Entries (runs plus shared clusters) of all maps of one image together: about 64
/// bytes each, so at most ~16 MiB, whatever the image claims.
pub const MAX_ENTRIES: usize = 256 * 1024;

/// One guest range a host cluster supplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub guest: u64,
    /// Extended L2: which of the 32 subclusters hold data (the rest read as zeros).
    pub mask: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    guest: u64,
    count: u64,
    mask: Option<u32>,
}

/// Waiting host clusters, in runs: host `start + i*cs` supplies guest `guest + i*step`.
#[derive(Debug)]
pub struct Wanted {
    cs: u64,
    step: u64,
    runs: BTreeMap<u64, Run>,
    shared: BTreeMap<u64, Vec<Want>>,
    shared_len: usize,
}

/// The run map had no room: more entries than [`MAX_ENTRIES`] across the image's maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget;

impl Wanted {
    /// `step`: the guest distance between consecutive entries of a run (a cluster for
    /// data, an L2 table's coverage for L2 tables).
    pub fn new(cs: u64, step: u64) -> Self {
        Wanted {
            cs,
            step,
            runs: BTreeMap::new(),
            shared: BTreeMap::new(),
            shared_len: 0,
        }
    }

    /// Entries held (runs plus shared clusters).
    pub fn entries(&self) -> usize {
        self.runs.len() + self.shared_len
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.shared.is_empty()
    }

    /// The lowest host offset still waited for.
    pub fn first(&self) -> Option<u64> {
        let a = self.runs.keys().next().copied();
        let b = self.shared.keys().next().copied();
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether some run already waits for `host`.
    pub fn covers(&self, host: u64) -> bool {
        self.runs
            .range(..=host)
            .next_back()
            .is_some_and(|(&start, r)| host < start.saturating_add(r.count * self.cs))
    }

    /// Waits for `host` (aligned, beyond the stream's position). `others` is what the
    /// image's other maps hold, for the shared budget. Returns `Ok(false)` when a run
    /// already covers `host` and `shared_ok` is false (the caller's "duplicate" error).
    pub fn insert(
        &mut self,
        host: u64,
        w: Want,
        shared_ok: bool,
        others: usize,
    ) -> Result<bool, OverBudget> {
        let room = |n: usize| {
            if n + others >= MAX_ENTRIES {
                Err(OverBudget)
            } else {
                Ok(())
            }
        };
        if let Some((&start, run)) = self.runs.range_mut(..=host).next_back() {
            let end = start.saturating_add(run.count * self.cs);
            if host < end {
                if !shared_ok {
                    return Ok(false);
                }
                room(self.entries())?;
                self.shared.entry(host).or_default().push(w);
                self.shared_len += 1;
                return Ok(true);
            }
            if host == end
                && run.mask == w.mask
                && run.guest.checked_add(run.count * self.step) == Some(w.guest)
            {
                run.count += 1;
                return Ok(true);
            }
        }
        room(self.entries())?;
        self.runs.insert(
            host,
            Run {
                guest: w.guest,
                count: 1,
                mask: w.mask,
            },
        );
        Ok(true)
    }

    /// Everything waiting for `host`; called in host order, cluster by cluster, so a
    /// run that holds `host` starts at it.
    pub fn take(&mut self, host: u64) -> Taken {
        let mut t = Taken::default();
        if let Some(run) = self.runs.remove(&host) {
            t.first = Some(Want {
                guest: run.guest,
                mask: run.mask,
            });
            if run.count > 1 {
                self.runs.insert(
                    host + self.cs,
                    Run {
                        guest: run.guest + self.step,
                        count: run.count - 1,
                        mask: run.mask,
                    },
                );
            }
        }
        if let Some(v) = self.shared.remove(&host) {
            self.shared_len -= v.len();
            t.shared = v;
        }
        t
    }
}

/// What [`Wanted::take`] found for one host cluster.
#[derive(Debug, Default)]
pub struct Taken {
    pub first: Option<Want>,
    pub shared: Vec<Want>,
}

impl Taken {
    pub fn is_empty(&self) -> bool {
        self.first.is_none() && self.shared.is_empty()
    }

    pub fn wants(self) -> impl Iterator<Item = Want> {
        self.first.into_iter().chain(self.shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(guest: u64) -> Want {
        Want { guest, mask: None }
    }

    #[test]
    fn consecutive_clusters_make_one_run() {
        let mut m = Wanted::new(512, 512);
        for i in 0..100_000u64 {
            assert_eq!(m.insert(4096 + i * 512, w(i * 512), true, 0), Ok(true));
        }
        assert_eq!(m.entries(), 1);
        for i in 0..100_000u64 {
            let t = m.take(4096 + i * 512);
            assert_eq!(t.wants().collect::<Vec<_>>(), vec![w(i * 512)]);
        }
        assert!(m.is_empty());
    }

    #[test]
    fn gaps_and_guest_jumps_split_runs_and_shared_clusters_are_kept() {
        let mut m = Wanted::new(512, 512);
        assert_eq!(m.insert(1024, w(0), true, 0), Ok(true));
        assert_eq!(m.insert(1536, w(4096), true, 0), Ok(true)); // guest jump
        assert_eq!(m.insert(2048, w(4608), true, 0), Ok(true)); // extends the second
        assert_eq!(m.insert(1536, w(9999 * 512), true, 0), Ok(true)); // shared
        assert_eq!(m.insert(1536, w(1), false, 0), Ok(false)); // a duplicate
        assert_eq!(m.entries(), 3);
        assert_eq!(m.first(), Some(1024));
        assert_eq!(m.take(1024).wants().count(), 1);
        let t: Vec<_> = m.take(1536).wants().collect();
        assert_eq!(t, vec![w(4096), w(9999 * 512)]);
        assert_eq!(m.take(2048).wants().collect::<Vec<_>>(), vec![w(4608)]);
        assert!(m.is_empty());
    }

    #[test]
    fn the_budget_is_enforced() {
        let mut m = Wanted::new(512, 512);
        // Every other cluster: no runs form.
        let mut refused = false;
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            if m.insert(i * 1024, w(i * 512), true, 0).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
        assert!(m.entries() <= MAX_ENTRIES);
        assert_eq!(m.insert(1 << 40, w(0), true, MAX_ENTRIES), Err(OverBudget));
    }
}
