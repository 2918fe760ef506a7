//! Sinks that listeners share (an OTLP collector's exporter, an access log output): one per
//! destination, held weakly here, so one that no listener uses any more is let go.
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};

pub struct Shared<K, V> {
    open: Mutex<HashMap<K, Weak<V>>>,
}

impl<K, V> Default for Shared<K, V> {
    fn default() -> Self {
        Shared { open: Mutex::default() }
    }
}

impl<K: Eq + Hash + Clone, V> Shared<K, V> {
    /// The sink for `key`: the one in use, or a new one from `start`.
    pub fn get_or_try_start<E>(&self, key: &K, start: impl FnOnce() -> Result<V, E>) -> Result<Arc<V>, E> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|_, v| v.strong_count() > 0);
        if let Some(v) = open.get(key).and_then(Weak::upgrade) {
            return Ok(v);
        }
        let v = Arc::new(start()?);
        open.insert(key.clone(), Arc::downgrade(&v));
        Ok(v)
    }
}
