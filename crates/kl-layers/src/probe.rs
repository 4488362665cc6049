//! Optional recording of named intermediate tensors (golden-compatible names).

use std::collections::BTreeMap;

/// A recorded tensor: shape and f32 values.
pub type Recorded = (Vec<usize>, Vec<f32>);

/// Records intermediates when enabled; a no-op otherwise.
#[derive(Debug, Default)]
pub struct Probe {
    prefix: String,
    map: Option<BTreeMap<String, Recorded>>,
}

impl Probe {
    /// A probe that records nothing.
    pub fn off() -> Self {
        Probe {
            prefix: String::new(),
            map: None,
        }
    }

    /// A probe that records everything.
    pub fn on() -> Self {
        Probe {
            prefix: String::new(),
            map: Some(BTreeMap::new()),
        }
    }

    /// Whether recording is on (callers skip probe-only work otherwise).
    #[inline]
    pub fn enabled(&self) -> bool {
        self.map.is_some()
    }

    /// Set the name prefix (e.g. `layers.3.`).
    pub fn set_prefix(&mut self, prefix: impl Into<String>) {
        self.prefix = prefix.into();
    }

    /// Record `data` with `shape` under `prefix + name`. Repeated names (chunked prefill)
    /// are concatenated along the first axis.
    pub fn record(&mut self, name: &str, shape: &[usize], data: &[f32]) {
        if let Some(map) = &mut self.map {
            let key = format!("{}{}", self.prefix, name);
            match map.get_mut(&key) {
                Some((s, v)) if s[1..] == shape[1..] => {
                    s[0] += shape[0];
                    v.extend_from_slice(data);
                }
                _ => {
                    map.insert(key, (shape.to_vec(), data.to_vec()));
                }
            }
        }
    }

    /// Everything recorded so far.
    pub fn take(&mut self) -> BTreeMap<String, Recorded> {
        self.map.as_mut().map(std::mem::take).unwrap_or_default()
    }
}
