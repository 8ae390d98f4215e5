//! Bounded metric label values for names a client controls.
//!
//! A request's `model` (its body), its target model (`x-llm-d-model-name-rewrite`) and its
//! fairness id (`x-llm-d-inference-fairness-id`) end up as label values of the EPP's metrics.
//! Taken verbatim, every distinct value is a new set of series that lives for the process's
//! lifetime: 40,000 requests with made-up model names once made `/metrics` 665 MB. So a name
//! becomes a label value only when something other than the client vouches for it; any other
//! name is counted under the single value [`OTHER`].
//!
//! # Which model names are kept
//!
//! A model name is *known*, and labelled as itself, when
//!
//! 1. **the operator names it**: an `InferenceModelRewrite` matches it or rewrites to it
//!    ([`KnownNames::sync_objectives`], refreshed whenever the objectives file is reloaded);
//! 2. **an endpoint advertises it**: a LoRA adapter listed by a model server's
//!    `vllm:lora_requests_info` ([`KnownNames::advertise`]; model servers are trusted, the
//!    list is theirs);
//! 3. **a model server served it**: a response with a 2xx status to a request sent as that
//!    model ([`KnownNames::learn`]). vLLM (and `llmsched sim`) answer 404 for a model they do
//!    not serve, so this admits exactly the base model and the adapters in use, which is what
//!    a deployment with one base model and a few LoRA adapters expects to see per series,
//!    without configuring anything. Because some servers accept any name (they ignore the
//!    field), learned names are capped ([`DEFAULT_MAX_LEARNED_MODELS`]); names beyond the cap
//!    fold into [`OTHER`].
//!
//! A name is judged when the request is routed and that label is kept for the request's whole
//! life (a gauge incremented under one label is decremented under the same one). Until a
//! model's first successful response, its requests count under [`OTHER`]; from then on, under
//! its name. The empty name (no model in the body) stays empty.
//!
//! # Fairness ids
//!
//! Nothing configures them (they are tenants, chosen by clients or a gateway), so the first
//! [`DEFAULT_MAX_FAIRNESS_IDS`] distinct ids keep their own label and later ones fold into
//! [`OTHER`]. Flow control itself still keys its queues by the real id; only the label folds.
//!
//! # Why folding and not an LRU of label sets
//!
//! An LRU would evict the series of real models whenever a burst of junk names arrived:
//! counters would restart from zero (read by Prometheus as resets, with the increments of the
//! evicted span lost), gauges such as `inference_objective_running_requests` could not be
//! evicted while non-zero, and under a steady stream of junk every real series would churn.
//! Folding keeps every real series stable and makes junk visible as one `other` series whose
//! rate is the junk's rate. The bound: (configured + advertised + at most
//! `max_learned` learned) model names, plus `other`, per label; pairs of (model, target)
//! are bounded by their product.
//!
//! Lookups are one `ArcSwap` load and a hash lookup; the sets change rarely (a reload, a new
//! adapter, a first successful response) and are replaced copy-on-write.

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::objectives::Objectives;

/// The label value of every name nobody vouches for.
pub const OTHER: &str = "other";

/// Default cap on model names admitted because a model server answered 2xx for them.
pub const DEFAULT_MAX_LEARNED_MODELS: usize = 64;

/// Default cap on fairness ids with their own label.
pub const DEFAULT_MAX_FAIRNESS_IDS: usize = 64;

#[derive(Default, Clone)]
struct Sets {
    /// From objectives and rewrites.
    configured: HashSet<String>,
    /// The objectives `configured` was computed from.
    configured_from: Option<Arc<Objectives>>,
    /// LoRA adapters advertised by endpoints.
    advertised: HashSet<String>,
    /// Served with a 2xx (bounded).
    learned: HashSet<String>,
    /// Fairness ids with their own label (bounded).
    fairness: HashSet<String>,
}

impl Sets {
    fn knows(&self, name: &str) -> bool {
        self.configured.contains(name)
            || self.advertised.contains(name)
            || self.learned.contains(name)
    }
}

/// The names allowed as label values (see the module documentation). Cheap to clone: every
/// clone shares the same sets.
#[derive(Clone)]
pub struct KnownNames {
    sets: Arc<ArcSwap<Sets>>,
    max_learned: usize,
    max_fairness: usize,
}

impl Default for KnownNames {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LEARNED_MODELS, DEFAULT_MAX_FAIRNESS_IDS)
    }
}

impl std::fmt::Debug for KnownNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.sets.load();
        f.debug_struct("KnownNames")
            .field("configured", &s.configured.len())
            .field("advertised", &s.advertised.len())
            .field("learned", &s.learned.len())
            .field("fairness", &s.fairness.len())
            .finish()
    }
}

impl KnownNames {
    /// Empty sets with the given caps.
    pub fn new(max_learned: usize, max_fairness: usize) -> Self {
        Self {
            sets: Arc::new(ArcSwap::from_pointee(Sets::default())),
            max_learned,
            max_fairness,
        }
    }

    /// True when `name` may be a label value as it is (known, or empty).
    pub fn is_known(&self, name: &str) -> bool {
        name.is_empty() || self.sets.load().knows(name)
    }

    /// The label value of model `name`: the name when known (or empty), else [`OTHER`].
    pub fn model<'a>(&self, name: &'a str) -> &'a str {
        if self.is_known(name) { name } else { OTHER }
    }

    /// Takes the model names of `objectives` (rewrite matches and targets) as the configured
    /// set, unless this very snapshot was taken already.
    pub fn sync_objectives(&self, objectives: &Arc<Objectives>) {
        let current = self.sets.load();
        if current
            .configured_from
            .as_ref()
            .is_some_and(|o| Arc::ptr_eq(o, objectives))
        {
            return;
        }
        let configured: HashSet<String> = objectives.model_names().map(str::to_string).collect();
        self.sets.rcu(|s| {
            let mut next = Sets::clone(s);
            next.configured = configured.clone();
            next.configured_from = Some(objectives.clone());
            next
        });
    }

    /// Adds a name an endpoint advertises (a LoRA adapter it lists). Not capped: the model
    /// servers, not clients, choose these.
    pub fn advertise(&self, name: &str) {
        if name.is_empty() || self.sets.load().knows(name) {
            return;
        }
        self.sets.rcu(|s| {
            let mut next = Sets::clone(s);
            next.advertised.insert(name.to_string());
            next
        });
    }

    /// A model server answered 2xx to a request for `name`: admits it while fewer than the
    /// cap were admitted this way. True when `name` is known afterwards.
    pub fn learn(&self, name: &str) -> bool {
        let current = self.sets.load();
        if name.is_empty() || current.knows(name) {
            return true;
        }
        if current.learned.len() >= self.max_learned {
            return false;
        }
        drop(current);
        let max = self.max_learned;
        self.sets.rcu(|s| {
            let mut next = Sets::clone(s);
            if next.learned.len() < max {
                next.learned.insert(name.to_string());
            }
            next
        });
        self.sets.load().knows(name)
    }

    /// The label value of fairness id `id`: itself if it is one of the first
    /// `max_fairness` distinct ids seen (admitting it if there is room), else [`OTHER`].
    pub fn fairness<'a>(&self, id: &'a str) -> &'a str {
        let current = self.sets.load();
        if id.is_empty() || current.fairness.contains(id) {
            return id;
        }
        if current.fairness.len() >= self.max_fairness {
            return OTHER;
        }
        drop(current);
        let max = self.max_fairness;
        self.sets.rcu(|s| {
            let mut next = Sets::clone(s);
            if next.fairness.len() < max {
                next.fairness.insert(id.to_string());
            }
            next
        });
        if self.sets.load().fairness.contains(id) {
            id
        } else {
            OTHER
        }
    }

    /// Number of names admitted by [`Self::learn`].
    pub fn learned_count(&self) -> usize {
        self.sets.load().learned.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objectives::parse_manifests;

    #[test]
    fn unknown_names_fold_until_vouched_for() {
        let k = KnownNames::new(2, 2);
        assert_eq!(k.model(""), "");
        assert_eq!(k.model("base"), OTHER);
        assert!(k.learn("base"));
        assert_eq!(k.model("base"), "base");
        k.advertise("adapter-1");
        assert_eq!(k.model("adapter-1"), "adapter-1");
        // The learned cap holds; advertised names do not count against it.
        assert!(k.learn("x"));
        assert!(!k.learn("y"));
        assert_eq!(k.model("y"), OTHER);
        assert_eq!(k.learned_count(), 2);
        k.advertise("adapter-2");
        assert_eq!(k.model("adapter-2"), "adapter-2");
    }

    #[test]
    fn objectives_name_models() {
        let k = KnownNames::default();
        let o = Arc::new(
            parse_manifests(
                "apiVersion: llm-d.ai/v1alpha1\nkind: InferenceModelRewrite\nmetadata: {name: r}\nspec:\n  rules:\n  - matches: [{model: {value: food-review}}]\n    targets: [{modelRewrite: food-review-v2, weight: 1}]\n  - targets: [{modelRewrite: catch-all}]\n",
                "t",
            )
            .unwrap(),
        );
        k.sync_objectives(&o);
        for m in ["food-review", "food-review-v2", "catch-all"] {
            assert_eq!(k.model(m), m);
        }
        assert_eq!(k.model("anything-else"), OTHER);
        // A reload replaces the configured set.
        k.sync_objectives(&Arc::new(Objectives::default()));
        assert_eq!(k.model("food-review"), OTHER);
    }

    #[test]
    fn fairness_ids_are_capped() {
        let k = KnownNames::new(0, 2);
        assert_eq!(k.fairness("a"), "a");
        assert_eq!(k.fairness("b"), "b");
        assert_eq!(k.fairness("c"), OTHER);
        assert_eq!(k.fairness("a"), "a");
        assert_eq!(k.fairness(""), "");
    }
}
