//! A daemon's metrics: atomic counters the workers update lock-free, and a plain copy of
//! them that the control socket serves as JSON. [`metrics!`](crate::metrics!) declares both
//! from one list of fields.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A field of a daemon's metrics, read for a snapshot. Each field is read on its own
/// (relaxed): a snapshot is not one instant, which counters do not need.
pub trait Counter {
    type Value;

    fn read(&self) -> Self::Value;
}

impl Counter for AtomicU64 {
    type Value = u64;

    fn read(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
}

impl Counter for AtomicBool {
    type Value = bool;

    fn read(&self) -> bool {
        self.load(Ordering::Relaxed)
    }
}

/// Declares a daemon's metrics struct (fields `AtomicU64` or `AtomicBool`, `Default`), its
/// snapshot (the same fields as `u64` and `bool`, in the same order, `serde::Serialize`: the
/// caller depends on `serde`), `add` to count and `snapshot` to copy.
///
/// ```
/// use std::sync::atomic::{AtomicBool, AtomicU64};
///
/// daemon_util::metrics! {
///     /// Counters of one device.
///     pub struct Metrics {
///         /// Requests served.
///         pub requests: AtomicU64,
///         pub connected: AtomicBool,
///     }
///     snapshot MetricsSnapshot;
/// }
///
/// let metrics = Metrics::default();
/// Metrics::add(&metrics.requests, 2);
/// assert_eq!(metrics.snapshot().requests, 2);
/// ```
#[macro_export]
macro_rules! metrics {
    (
        $(#[$attribute:meta])*
        pub struct $metrics:ident {
            $( $(#[$field_attribute:meta])* pub $field:ident: $kind:ty, )*
        }
        snapshot $snapshot:ident;
    ) => {
        $(#[$attribute])*
        #[derive(Debug, Default)]
        pub struct $metrics {
            $( $(#[$field_attribute])* pub $field: $kind, )*
        }

        #[doc = concat!(
            "A point-in-time copy of [`", stringify!($metrics), "`], as served by `status`."
        )]
        #[derive(Debug, Clone, PartialEq, Eq, ::serde::Serialize)]
        pub struct $snapshot {
            $( pub $field: <$kind as $crate::Counter>::Value, )*
        }

        impl $metrics {
            pub fn add(counter: &::std::sync::atomic::AtomicU64, value: u64) {
                counter.fetch_add(value, ::std::sync::atomic::Ordering::Relaxed);
            }

            pub fn snapshot(&self) -> $snapshot {
                $snapshot {
                    $( $field: $crate::Counter::read(&self.$field), )*
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    crate::metrics! {
        /// Counters of a test device.
        pub struct Metrics {
            pub read_requests: AtomicU64,
            pub connected: AtomicBool,
            /// Bytes read.
            pub read_bytes: AtomicU64,
        }
        snapshot MetricsSnapshot;
    }

    #[test]
    fn snapshot_reads_counters_and_serializes_in_order() {
        let metrics = Metrics::default();
        Metrics::add(&metrics.read_bytes, 4096);
        Metrics::add(&metrics.read_requests, 1);
        Metrics::add(&metrics.read_requests, 1);
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.read_bytes, 4096);
        assert_eq!(snapshot.read_requests, 2);
        assert!(!snapshot.connected);
        metrics.connected.store(true, Ordering::Relaxed);
        assert_eq!(
            serde_json::to_string(&metrics.snapshot()).expect("json"),
            r#"{"read_requests":2,"connected":true,"read_bytes":4096}"#
        );
    }
}
