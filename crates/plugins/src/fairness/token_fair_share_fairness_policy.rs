//! `token-fair-share-fairness-policy`: the backlogged flow that has received the fewest
//! (weighted) tokens goes first — a virtual token counter per flow, as in start-time fair
//! queuing and the Virtual Token Counter of Sheng et al., "Fairness in Serving Large
//! Language Models" (OSDI 2024).
//!
//! A heavy tenant cannot starve a light one in the same band: whenever both wait, the one
//! with less service goes first, so under saturation backlogged flows converge to equal
//! token service, while a flow that asks for less than its share gets all it asks for.
//!
//! ## Formula
//!
//! Each flow `f` of the band has a counter `c(f)`, its service in weighted tokens. For a
//! request `r` with `p(r)` prompt tokens and `o(r)` output tokens:
//!
//! ```text
//! cost(r)      = wᵢ · p(r) + wₒ · o(r)
//! estimate(r)  = wᵢ · p̂(r) + wₒ · ô(r)
//!
//! dispatch of r from f:       c(f) += estimate(r)
//! completion with usage:      c(f) += cost(r) − estimate(r)      (usage from the response)
//! next flow:                  argmin over backlogged f of c(f); ties: the band's ordering
//!                             policy over the flows' heads (the oldest first under FCFS)
//! f becomes backlogged:       c(f) = max(c(f), V),   V = max(floor, min c(g) over the
//!                             other backlogged flows g)
//! floor:                      raised to V at every arrival, to min c(g) at every pick,
//!                             and to c(f) after a dispatch that leaves the band empty
//! ```
//!
//! A flow that comes back after being idle therefore starts level with the least-served
//! flow still waiting (or with the last one served): idle time is not banked as credit,
//! and using idle capacity is not held against a flow later.
//!
//! * `p̂(r)` is the prompt size known at dispatch (token ids counted exactly, text as
//!   characters / 4); the model server's `usage.prompt_tokens` replaces it at completion.
//! * `ô(r)` is the flow's average output: an exponential moving average (weight 1/8) of
//!   the `completion_tokens` its responses reported; for a flow without one yet, the band's
//!   average over all flows; before any response, `defaultOutputTokens`. It is capped by the
//!   request's `max_tokens`.
//!
//! Why estimate output at dispatch instead of charging it only at completion: a request is
//! in flight for seconds, and under saturation a flow that is charged nothing for its
//! in-flight output looks under-served and keeps winning until its responses complete; with
//! dozens of requests in flight that skews every decision made meanwhile. Why not charge
//! `max_tokens`: clients commonly set it far above what they use (or not at all), so it
//! would overcharge a flow by a large, client-chosen amount until completion. The moving
//! average is right on average for a steady tenant, and the correction at completion makes
//! the long-run accounting exact either way. A request that ends without usage (failed,
//! cancelled, usage not reported) keeps its estimate; one that never reached a model server
//! (released by flow control, then no endpoint could take it) is refunded.
//!
//! Counters are per band and bounded: an idle flow (nothing queued, nothing in flight) whose
//! counter is at or below the floor is forgotten — it would be lifted to at least the floor
//! on return, exactly like a new flow, so forgetting it changes nothing. When more than
//! `maxTrackedFlows` flows are tracked after that, idle flows with the smallest counters are
//! forgotten too (a returning one then starts at the floor, a gain of at most its lead over
//! it). Flows with queued or in-flight requests are never forgotten. Counters are `f64`
//! token counts, exact up to 2⁵³ tokens (decades at a million tokens per second).
//!
//! ## Parameters
//!
//! * `inputTokenWeight` (number ≥ 0, default `1`): `wᵢ`, weight of a prompt token.
//! * `outputTokenWeight` (number ≥ 0, default `1`): `wₒ`, weight of an output token (VTC
//!   suggests 2 to reflect decode cost).
//! * `defaultOutputTokens` (integer ≥ 0, default `256`): output estimate before any
//!   response reported usage.
//! * `maxTrackedFlows` (integer > 0, default `10000`): counters kept per band beyond which
//!   idle flows are forgotten.
//!
//! The weights must not both be 0.

use std::collections::HashMap;
use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::flowcontrol::{
    BandQueues, Charge, FairnessPolicy, FairnessState, QueuedRequest,
};
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::request::Usage;
use serde::Deserialize;

use crate::common::{impl_plugin, invalid, params};

/// Type name.
pub const TYPE: &str = "token-fair-share-fairness-policy";

/// Weight of a new sample in the output-length moving average.
const EWMA_WEIGHT: f64 = 1.0 / 8.0;
/// Accounts tracked before the first sweep.
const MIN_SWEEP_AT: usize = 64;

/// Parameters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TokenFairShareParams {
    /// Weight of a prompt token (default 1).
    pub input_token_weight: Option<f64>,
    /// Weight of an output token (default 1).
    pub output_token_weight: Option<f64>,
    /// Output estimate before any usage was reported (default 256).
    pub default_output_tokens: Option<u64>,
    /// Counters kept per band before idle flows are forgotten (default 10,000).
    pub max_tracked_flows: Option<u64>,
}

/// Validated parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Settings {
    w_in: f64,
    w_out: f64,
    default_output: f64,
    max_flows: usize,
}

impl Settings {
    fn from_params(p: &TokenFairShareParams) -> Result<Self, PluginError> {
        let weight = |v: Option<f64>, field: &str| -> Result<f64, PluginError> {
            let w = v.unwrap_or(1.0);
            if !w.is_finite() || w < 0.0 {
                return invalid!("{field} must be a finite number ≥ 0, got {w}");
            }
            Ok(w)
        };
        let w_in = weight(p.input_token_weight, "inputTokenWeight")?;
        let w_out = weight(p.output_token_weight, "outputTokenWeight")?;
        if w_in == 0.0 && w_out == 0.0 {
            return invalid!("inputTokenWeight and outputTokenWeight cannot both be 0");
        }
        let max_flows = p.max_tracked_flows.unwrap_or(10_000);
        if max_flows == 0 {
            return invalid!("maxTrackedFlows must be > 0");
        }
        Ok(Self {
            w_in,
            w_out,
            default_output: p.default_output_tokens.unwrap_or(256) as f64,
            max_flows: usize::try_from(max_flows).unwrap_or(usize::MAX),
        })
    }
}

/// The token fair-share fairness policy.
#[derive(Debug, Clone)]
pub struct TokenFairShareFairnessPolicy {
    name: String,
    settings: Settings,
}

impl TokenFairShareFairnessPolicy {
    /// A policy named `name` with `params`.
    pub fn new(
        name: impl Into<String>,
        params: &TokenFairShareParams,
    ) -> Result<Self, PluginError> {
        Ok(Self {
            name: name.into(),
            settings: Settings::from_params(params)?,
        })
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: TokenFairShareParams = params(i.parameters)?;
    Ok(Arc::new(TokenFairShareFairnessPolicy::new(i.name, &p)?))
}

impl_plugin!(TokenFairShareFairnessPolicy, TYPE, as_fairness_policy => FairnessPolicy);

impl FairnessPolicy for TokenFairShareFairnessPolicy {
    fn new_band_state(&self) -> Box<dyn FairnessState> {
        Box::new(TokenFairShare::new(self.settings))
    }
}

/// One flow's account.
#[derive(Debug, Clone, PartialEq)]
struct Account {
    /// Weighted tokens served (estimates for requests still in flight).
    counter: f64,
    /// Requests dispatched and not completed.
    in_flight: u32,
    /// Moving average of reported output tokens.
    output_avg: Option<f64>,
}

/// One band's counters.
struct TokenFairShare {
    settings: Settings,
    flows: HashMap<String, Account>,
    floor: f64,
    band_output_avg: Option<f64>,
    sweep_at: usize,
}

fn ewma(avg: Option<f64>, sample: f64) -> f64 {
    match avg {
        Some(a) => a + (sample - a) * EWMA_WEIGHT,
        None => sample,
    }
}

impl TokenFairShare {
    fn new(settings: Settings) -> Self {
        Self {
            settings,
            flows: HashMap::new(),
            floor: 0.0,
            band_output_avg: None,
            sweep_at: MIN_SWEEP_AT.min(settings.max_flows),
        }
    }

    fn counter(&self, flow: &str) -> f64 {
        self.flows.get(flow).map_or(self.floor, |a| a.counter)
    }

    /// `ô(r)`: the flow's average output, else the band's, else the default; at most
    /// `max_tokens`.
    fn output_estimate(&self, flow: &str, max_tokens: Option<u64>) -> f64 {
        let avg = self
            .flows
            .get(flow)
            .and_then(|a| a.output_avg)
            .or(self.band_output_avg)
            .unwrap_or(self.settings.default_output);
        match max_tokens {
            Some(m) => avg.min(m as f64),
            None => avg,
        }
    }

    /// Forgets idle flows at or below the floor, then, above `maxTrackedFlows`, the idle
    /// flows with the smallest counters.
    fn sweep(&mut self, band: &BandQueues) {
        let floor = self.floor;
        let idle = |id: &str, a: &Account| a.in_flight == 0 && band.flow(id).is_none();
        self.flows
            .retain(|id, a| !(idle(id, a) && a.counter <= floor));
        let max = self.settings.max_flows;
        if self.flows.len() > max {
            let mut candidates: Vec<(f64, String)> = self
                .flows
                .iter()
                .filter(|(id, a)| idle(id, a))
                .map(|(id, a)| (a.counter, id.clone()))
                .collect();
            candidates.sort_by(|a, b| a.0.total_cmp(&b.0));
            let excess = self.flows.len() - max;
            for (_, id) in candidates.into_iter().take(excess) {
                self.flows.remove(&id);
            }
        }
        self.sweep_at = (2 * self.flows.len()).clamp(MIN_SWEEP_AT.min(max), max);
    }
}

impl FairnessState for TokenFairShare {
    fn pick<'a>(&mut self, band: &'a BandQueues) -> Option<&'a str> {
        let ordering = band.ordering();
        let mut best: Option<(&'a str, f64, &'a QueuedRequest)> = None;
        for (id, q) in band.flows() {
            let Some(head) = q.head() else { continue };
            let c = self.counter(id);
            let better = match best {
                None => true,
                Some((_, bc, bh)) => c < bc || (c == bc && ordering.less(head, bh)),
            };
            if better {
                best = Some((id, c, head));
            }
        }
        let (id, c, _) = best?;
        self.floor = self.floor.max(c);
        Some(id)
    }

    fn on_arrival(&mut self, band: &BandQueues, flow: &str, was_backlogged: bool) {
        if was_backlogged && self.flows.contains_key(flow) {
            return;
        }
        let others = band
            .flows()
            .filter(|(id, _)| *id != flow)
            .map(|(id, _)| self.counter(id))
            .reduce(f64::min);
        let v = others.map_or(self.floor, |m| m.max(self.floor));
        self.floor = v;
        if self.flows.len() >= self.sweep_at && !self.flows.contains_key(flow) {
            self.sweep(band);
        }
        match self.flows.get_mut(flow) {
            Some(a) => a.counter = a.counter.max(v),
            None => {
                self.flows.insert(
                    flow.to_string(),
                    Account {
                        counter: v,
                        in_flight: 0,
                        output_avg: None,
                    },
                );
            }
        }
    }

    fn on_dispatch(&mut self, band: &BandQueues, flow: &str, request: &QueuedRequest) -> Charge {
        let s = self.settings;
        let charge = s.w_in * request.prompt_tokens as f64
            + s.w_out * self.output_estimate(flow, request.max_tokens);
        let floor = self.floor;
        let account = self.flows.entry(flow.to_string()).or_insert(Account {
            counter: floor,
            in_flight: 0,
            output_avg: None,
        });
        account.counter += charge;
        account.in_flight += 1;
        if band.flow_count() == 0 {
            self.floor = self.floor.max(account.counter);
        }
        Charge(charge)
    }

    fn on_completion(&mut self, flow: &str, charge: Charge, usage: Option<&Usage>) {
        let s = self.settings;
        let Some(account) = self.flows.get_mut(flow) else {
            return;
        };
        account.in_flight = account.in_flight.saturating_sub(1);
        if let Some(u) = usage {
            let cost = s.w_in * u.prompt_tokens as f64 + s.w_out * u.completion_tokens as f64;
            account.counter += cost - charge.0;
            let out = u.completion_tokens as f64;
            account.output_avg = Some(ewma(account.output_avg, out));
            self.band_output_avg = Some(ewma(self.band_output_avg, out));
        }
    }

    fn on_not_served(&mut self, flow: &str, charge: Charge) {
        if let Some(account) = self.flows.get_mut(flow) {
            account.in_flight = account.in_flight.saturating_sub(1);
            account.counter -= charge.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::{build, build_err};
    use crate::fairness::GlobalStrictFairnessPolicy;
    use crate::fairness::testutil::{band, dispatch, enqueue};

    fn settings(w_in: f64, w_out: f64, default_output: u64) -> Settings {
        Settings::from_params(&TokenFairShareParams {
            input_token_weight: Some(w_in),
            output_token_weight: Some(w_out),
            default_output_tokens: Some(default_output),
            max_tracked_flows: None,
        })
        .unwrap()
    }

    fn usage(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cached_tokens: 0,
        }
    }

    #[test]
    fn dispatch_charges_the_estimate_and_completion_corrects_it() {
        let mut st = TokenFairShare::new(settings(1.0, 2.0, 50));
        let mut b = band();
        enqueue(&mut st, &mut b, "a", 1, 100, None);
        enqueue(&mut st, &mut b, "a", 2, 100, Some(30));
        let (_, _, c1) = dispatch(&mut st, &mut b).unwrap();
        // 1·100 + 2·50 (default output).
        assert_eq!(c1, Charge(200.0));
        let (_, _, c2) = dispatch(&mut st, &mut b).unwrap();
        // Output estimate capped by max_tokens: 1·100 + 2·30.
        assert_eq!(c2, Charge(160.0));
        assert_eq!(st.flows["a"].counter, 360.0);
        assert_eq!(st.flows["a"].in_flight, 2);
        // The first response reports 120 prompt + 10 output: cost 140, charged 200.
        st.on_completion("a", c1, Some(&usage(120, 10)));
        assert_eq!(st.flows["a"].counter, 300.0);
        assert_eq!(st.flows["a"].output_avg, Some(10.0));
        // No usage: the estimate stands.
        st.on_completion("a", c2, None);
        assert_eq!(st.flows["a"].counter, 300.0);
        assert_eq!(st.flows["a"].in_flight, 0);
        // "a" comes back after its queue emptied: lifted to the floor, 360 (its counter
        // after the dispatch that emptied the band). A request that never reached a model
        // server is then refunded in full.
        enqueue(&mut st, &mut b, "a", 3, 40, Some(0));
        assert_eq!(st.counter("a"), 360.0);
        let (_, _, c3) = dispatch(&mut st, &mut b).unwrap();
        assert_eq!(
            (c3, st.flows["a"].counter, st.flows["a"].in_flight),
            (Charge(40.0), 400.0, 1)
        );
        st.on_not_served("a", c3);
        assert_eq!((st.flows["a"].counter, st.flows["a"].in_flight), (360.0, 0));
        // The next estimate uses the flow's average, 1/8 moving: 10 then 10 + (50−10)/8 = 15.
        st.on_completion("a", Charge(0.0), Some(&usage(0, 50)));
        assert_eq!(st.output_estimate("a", None), 15.0);
        // A flow with no history uses the band's average.
        assert_eq!(st.output_estimate("new", None), 15.0);
        assert_eq!(st.output_estimate("new", Some(4)), 4.0);
    }

    #[test]
    fn the_least_served_backlogged_flow_goes_first() {
        let mut st = TokenFairShare::new(settings(1.0, 0.0, 0));
        let mut b = band();
        // "big" sends 300-token prompts, "small" 100-token prompts, all queued at once.
        for seq in 0..4 {
            enqueue(&mut st, &mut b, "big", seq, 300, None);
        }
        for seq in 4..12 {
            enqueue(&mut st, &mut b, "small", seq, 100, None);
        }
        let mut order = String::new();
        while let Some((flow, _, _)) = dispatch(&mut st, &mut b) {
            order.push(if flow == "big" { 'B' } else { 's' });
        }
        // Ties go to the oldest head ("big" enqueued first); then least tokens first:
        // B(300) s s s(300) B(600) s s s(600) B(900) s s(800) ...
        assert_eq!(order, "BsssBsssBssB");
        assert_eq!(st.flows["big"].counter, 1200.0);
        assert_eq!(st.flows["small"].counter, 800.0);
    }

    #[test]
    fn a_newly_backlogged_flow_starts_level_with_the_least_served() {
        let mut st = TokenFairShare::new(settings(1.0, 0.0, 0));
        let mut b = band();
        for seq in 0..5 {
            enqueue(&mut st, &mut b, "a", seq, 100, None);
            enqueue(&mut st, &mut b, "b", 10 + seq, 100, None);
        }
        for _ in 0..6 {
            dispatch(&mut st, &mut b).unwrap();
        }
        assert_eq!((st.counter("a"), st.counter("b")), (300.0, 300.0));
        // "c" was idle all along: it is lifted to 300, not credited with 300 tokens.
        enqueue(&mut st, &mut b, "c", 100, 100, None);
        assert_eq!(st.counter("c"), 300.0);
        // A flow with a larger counter keeps it.
        let mut b2 = band();
        st.flows.insert(
            "d".into(),
            Account {
                counter: 900.0,
                in_flight: 0,
                output_avg: None,
            },
        );
        enqueue(&mut st, &mut b2, "d", 1, 100, None);
        assert_eq!(st.counter("d"), 900.0);
        // Nothing else waits in b2: V is the floor (300, the last min seen).
        assert_eq!(st.floor, 300.0);
    }

    #[test]
    fn uncontended_service_is_not_held_against_a_flow() {
        let mut st = TokenFairShare::new(settings(1.0, 0.0, 0));
        let mut b = band();
        // "heavy" alone, each request dispatched as soon as it arrives (band empties).
        for seq in 0..10 {
            enqueue(&mut st, &mut b, "heavy", seq, 100, None);
            dispatch(&mut st, &mut b).unwrap();
        }
        assert_eq!(st.counter("heavy"), 1000.0);
        assert_eq!(st.floor, 1000.0);
        // "light" arrives: it starts at the floor, level with heavy, so they alternate.
        for seq in 10..14 {
            enqueue(&mut st, &mut b, "heavy", seq, 100, None);
        }
        for seq in 20..24 {
            enqueue(&mut st, &mut b, "light", seq, 100, None);
        }
        assert_eq!(st.counter("light"), 1000.0);
        let order: Vec<String> = (0..8)
            .map(|_| dispatch(&mut st, &mut b).unwrap().0)
            .collect();
        assert_eq!(
            order,
            [
                "heavy", "light", "heavy", "light", "heavy", "light", "heavy", "light"
            ]
        );
    }

    /// A heavy tenant offering 10 requests per round and a light one offering 1, against
    /// room for 2 dispatches per round: the light tenant is served in full under token fair
    /// share, and gets ≈ 2/11 of a request per round under global strict FCFS.
    #[test]
    fn a_heavy_tenant_cannot_starve_a_light_one() {
        fn run(mut st: Box<dyn FairnessState>) -> (u64, u64) {
            let mut b = band();
            let (mut seq, mut served_heavy, mut served_light) = (0u64, 0u64, 0u64);
            for _ in 0..200 {
                for _ in 0..10 {
                    enqueue(st.as_mut(), &mut b, "heavy", seq, 100, Some(10));
                    seq += 1;
                }
                enqueue(st.as_mut(), &mut b, "light", seq, 100, Some(10));
                seq += 1;
                for _ in 0..2 {
                    let (flow, req, charge) = dispatch(st.as_mut(), &mut b).unwrap();
                    st.on_completion(&flow, charge, Some(&usage(req.prompt_tokens, 10)));
                    if flow == "heavy" {
                        served_heavy += 1;
                    } else {
                        served_light += 1;
                    }
                }
            }
            (served_heavy, served_light)
        }
        let fair = TokenFairShareFairnessPolicy::new(TYPE, &TokenFairShareParams::default())
            .unwrap()
            .new_band_state();
        let (heavy, light) = run(fair);
        assert_eq!(
            light, 200,
            "light offered 200 and got {light} (heavy {heavy})"
        );
        assert_eq!(heavy, 200);
        let fcfs = GlobalStrictFairnessPolicy::new("g").new_band_state();
        let (heavy, light) = run(fcfs);
        // FCFS serves in arrival order: the first 400 arrivals, 1 in 11 of them light.
        assert_eq!(heavy + light, 400);
        assert_eq!(light, 36, "light under FCFS");
    }

    #[test]
    fn idle_flows_at_or_below_the_floor_are_forgotten_and_the_count_is_bounded() {
        let params = TokenFairShareParams {
            max_tracked_flows: Some(100),
            input_token_weight: Some(1.0),
            output_token_weight: Some(0.0),
            ..Default::default()
        };
        let mut st = TokenFairShare::new(Settings::from_params(&params).unwrap());
        let mut b = band();
        // One-off flows, each served once alone: every one ends above the floor of its time
        // but below the next one's.
        for i in 0..1000u64 {
            let flow = format!("f{i}");
            enqueue(&mut st, &mut b, &flow, i, 10, None);
            let (f, _, c) = dispatch(&mut st, &mut b).unwrap();
            st.on_completion(&f, c, None);
            assert!(
                st.flows.len() <= 100,
                "{} accounts after {i}",
                st.flows.len()
            );
        }
        // A flow with a request in flight is kept however many others come.
        let mut st = TokenFairShare::new(Settings::from_params(&params).unwrap());
        enqueue(&mut st, &mut b, "busy", 0, 10, None);
        let (_, _, busy_charge) = dispatch(&mut st, &mut b).unwrap();
        for i in 0..500u64 {
            let flow = format!("g{i}");
            enqueue(&mut st, &mut b, &flow, i + 1, 10, None);
            let (f, _, c) = dispatch(&mut st, &mut b).unwrap();
            st.on_completion(&f, c, None);
        }
        assert!(st.flows.contains_key("busy"));
        st.on_completion("busy", busy_charge, None);
        assert_eq!(st.flows["busy"].in_flight, 0);
    }

    #[test]
    fn parameters_are_validated() {
        let p = build(TYPE, Some(serde_json::json!({"inputTokenWeight": 1, "outputTokenWeight": 2, "defaultOutputTokens": 100, "maxTrackedFlows": 5}))).unwrap();
        assert!(p.as_fairness_policy().is_some());
        assert!(
            build_err(TYPE, serde_json::json!({"outputTokenWeight": -1}))
                .contains("outputTokenWeight must be")
        );
        assert!(
            build_err(
                TYPE,
                serde_json::json!({"inputTokenWeight": 0, "outputTokenWeight": 0})
            )
            .contains("cannot both be 0")
        );
        assert!(
            build_err(TYPE, serde_json::json!({"maxTrackedFlows": 0}))
                .contains("maxTrackedFlows must be > 0")
        );
        assert!(
            build_err(TYPE, serde_json::json!({"weight": 1})).contains("unknown field `weight`")
        );
        assert!(
            build_err(TYPE, serde_json::json!({"defaultOutputTokens": -3}))
                .contains("invalid value")
        );
    }
}
