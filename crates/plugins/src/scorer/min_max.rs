//! The inverse min-max scorer shared by `queue-scorer` and `running-requests-size-scorer`:
//! one implementation, parameterised by the endpoint metric it reads ([`LoadMetric`]).
//!
//! ## Formula
//!
//! With `v(e)` the metric of endpoint `e` and `min`/`max` taken over the candidates:
//!
//! ```text
//! score(e) = (max − v(e)) / (max − min)        when max > min
//! score(e) = 1                                 when every candidate has the same value
//! ```
//!
//! The lowest value scores 1 and the highest 0, whatever the absolute values. Reads one
//! metrics snapshot per candidate and allocates nothing.

use std::marker::PhantomData;
use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::endpoint::EndpointMetrics;
use llmsched_core::plugin::{Candidate, SchedulingContext, Scorer, ScorerCategory};
use llmsched_core::registry::{FactoryInput, PluginError};

use super::NoParameters;
use crate::common::params;

/// An endpoint metric where lower is better, and the type name of the scorer over it.
pub trait LoadMetric: Send + Sync + 'static {
    /// The registered type name of the scorer over this metric.
    const TYPE: &'static str;
    /// The metric's value for one endpoint.
    fn value(metrics: &EndpointMetrics) -> f64;
}

/// Scores candidates by the inverse min-max normalisation of metric `M`.
pub struct MinMaxScorer<M> {
    name: String,
    metric: PhantomData<fn() -> M>,
}

impl<M> std::fmt::Debug for MinMaxScorer<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MinMaxScorer")
            .field("name", &self.name)
            .finish()
    }
}

impl<M> Clone for MinMaxScorer<M> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            metric: PhantomData,
        }
    }
}

impl<M: LoadMetric> MinMaxScorer<M> {
    /// A scorer named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            metric: PhantomData,
        }
    }

    /// Factory: no parameters (`{}` or none); any parameter is an error.
    pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
        let _: NoParameters = params(i.parameters)?;
        Ok(Arc::new(Self::new(i.name)))
    }
}

impl<M: LoadMetric> Plugin for MinMaxScorer<M> {
    fn type_name(&self) -> &'static str {
        M::TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn as_scorer(self: Arc<Self>) -> Option<Arc<dyn Scorer>> {
        Some(self)
    }
}

impl<M: LoadMetric> Scorer for MinMaxScorer<M> {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Distribution
    }

    fn score(&self, _cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]) {
        for (s, e) in scores.iter_mut().zip(candidates) {
            *s = M::value(&e.metrics());
        }
        invert_min_max(scores);
    }
}

/// `values` holds the raw per-candidate values on entry and `(max − v) / (max − min)` on
/// exit (all equal → 1).
pub(crate) fn invert_min_max(values: &mut [f64]) {
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    for &v in values.iter() {
        min = min.min(v);
        max = max.max(v);
    }
    if values.is_empty() || max == min {
        values.fill(1.0);
        return;
    }
    let span = max - min;
    for v in values.iter_mut() {
        *v = (max - *v) / span;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_min_max() {
        let mut v = [3.0, 1.0, 5.0];
        invert_min_max(&mut v);
        assert_eq!(v, [0.5, 1.0, 0.0]);
        let mut same = [2.0, 2.0];
        invert_min_max(&mut same);
        assert_eq!(same, [1.0, 1.0]);
        let mut empty: [f64; 0] = [];
        invert_min_max(&mut empty);
    }
}
