//! `random-picker`: endpoints chosen uniformly at random, ignoring scores.
//!
//! ## Rule
//!
//! A uniformly random ordered sample without replacement of `min(maxNumOfEndpoints, n)`
//! candidates (partial Fisher–Yates shuffle: O(maxNumOfEndpoints), no allocation).
//!
//! ## Parameters
//!
//! * `maxNumOfEndpoints` (integer, default `1`): endpoints returned; ≤ 0 falls back to 1.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::plugin::{Picked, Picker, SchedulingContext, ScoredEndpoint};
use llmsched_core::registry::{FactoryInput, PluginError};
use rand::Rng;

use super::PickerParams;
use crate::common::{impl_plugin, params, with_rng};

/// Type name.
pub const TYPE: &str = "random-picker";

/// The random picker.
#[derive(Debug, Clone)]
pub struct RandomPicker {
    name: String,
    max_num: usize,
}

impl RandomPicker {
    /// A picker returning up to `max_num` endpoints.
    pub fn new(name: impl Into<String>, max_num: usize) -> Self {
        Self {
            name: name.into(),
            max_num: max_num.max(1),
        }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: PickerParams = params(i.parameters)?;
    Ok(Arc::new(RandomPicker::new(i.name, p.count(TYPE))))
}

impl_plugin!(RandomPicker, TYPE, as_picker => Picker);

/// Moves a uniform random sample of `n` elements to the front of `s`, in random order.
pub(crate) fn sample_front<T>(s: &mut [T], n: usize) {
    let len = s.len();
    with_rng(|r| {
        for i in 0..n.min(len) {
            let j = r.random_range(i..len);
            s.swap(i, j);
        }
    });
}

impl Picker for RandomPicker {
    fn pick<'a>(
        &self,
        _cx: &SchedulingContext<'_>,
        scored: &mut [ScoredEndpoint<'a>],
    ) -> Picked<'a> {
        let n = self.max_num.min(scored.len());
        sample_front(scored, n);
        scored[..n].iter().map(|s| s.endpoint).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use crate::picker::testutil::*;

    #[test]
    fn uniform_regardless_of_scores() {
        let p = build(TYPE, None).unwrap();
        let eps = endpoints(3);
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            counts[pick(&p, &eps, &[100.0, 0.0, 0.0])[0] as usize] += 1;
        }
        for c in counts {
            assert!((800..=1200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn distinct_endpoints_up_to_the_count() {
        let p = build(TYPE, Some(serde_json::json!({"maxNumOfEndpoints": 3}))).unwrap();
        let eps = endpoints(5);
        for _ in 0..200 {
            let mut got = pick(&p, &eps, &[0.0; 5]);
            assert_eq!(got.len(), 3);
            got.sort_unstable();
            got.dedup();
            assert_eq!(got.len(), 3);
        }
        assert_eq!(pick(&p, &eps[..2], &[0.0; 2]).len(), 2);
        assert!(pick(&p, &[], &[]).is_empty());
    }

    #[test]
    fn parameters() {
        let p = build(TYPE, Some(serde_json::json!({"maxNumOfEndpoints": -2}))).unwrap();
        assert_eq!(pick(&p, &endpoints(3), &[0.0; 3]).len(), 1);
        assert!(
            build_err(TYPE, serde_json::json!({"maxNumOfEndpoints": 1.5})).contains("invalid type")
        );
        assert!(build_err(TYPE, serde_json::json!({"seed": 1})).contains("unknown field"));
    }
}
