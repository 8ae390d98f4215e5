//! `single-profile-handler`: runs the configuration's one profile once and makes it primary.
//!
//! ## Rule
//!
//! * Profiles to run: every profile not run yet (the first call returns them all, the next
//!   call none).
//! * Result: exactly one profile must have run, else the error "single profile handler is
//!   intended to be used with a single profile, failed to process multiple profiles"; if it
//!   failed (its filters left nothing), the error `failed to run scheduler profile
//!   '<name>'`. The scheduler turns either into 429 `failed to find target endpoint: ...`.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::plugin::{ProfileHandler, SchedulingContext};
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::scheduler::{
    ProfileResults, SchedulerProfile, SchedulingError, SchedulingResult,
};
use smallvec::SmallVec;

use crate::common::{impl_plugin, params};
use crate::scorer::NoParameters;

/// Type name.
pub const TYPE: &str = "single-profile-handler";

/// Error when several profiles ran.
pub const MULTIPLE_PROFILES_MSG: &str = "single profile handler is intended to be used with a single profile, failed to process multiple profiles";

/// The single profile handler.
#[derive(Debug, Clone)]
pub struct SingleProfileHandler {
    name: String,
}

impl SingleProfileHandler {
    /// A handler named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(SingleProfileHandler::new(i.name)))
}

impl_plugin!(SingleProfileHandler, TYPE, as_profile_handler => ProfileHandler);

impl ProfileHandler for SingleProfileHandler {
    fn pick_profiles(
        &self,
        _cx: &SchedulingContext<'_>,
        profiles: &[Arc<SchedulerProfile>],
        results: &ProfileResults,
    ) -> SmallVec<[usize; 2]> {
        (0..profiles.len())
            .filter(|&i| !results.has_run(i))
            .collect()
    }

    fn process_results(
        &self,
        _cx: &SchedulingContext<'_>,
        results: ProfileResults,
    ) -> Result<SchedulingResult, SchedulingError> {
        let multiple = || SchedulingError::Handler(MULTIPLE_PROFILES_MSG.to_string());
        if results.len() != 1 {
            return Err(multiple());
        }
        let Some((_, name, result)) = results.entries.into_iter().next() else {
            return Err(multiple());
        };
        let result = result.ok_or_else(|| SchedulingError::ProfileFailed(name.clone()))?;
        Ok(SchedulingResult {
            primary_profile: name.clone(),
            profiles: vec![(name, result)],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;
    use llmsched_core::scheduler::ProfileRunResult;
    use std::time::Instant;

    fn profile(name: &str) -> Arc<SchedulerProfile> {
        let picker = build("max-score-picker", None)
            .unwrap()
            .as_picker()
            .unwrap();
        Arc::new(
            SchedulerProfile::builder(name, None)
                .picker(picker)
                .build()
                .unwrap(),
        )
    }

    #[test]
    fn runs_every_profile_once_then_stops() {
        let h = SingleProfileHandler::new(TYPE);
        let req = request("m");
        let cycle = CycleState::new();
        let cx = SchedulingContext {
            request: &req,
            cycle: &cycle,
            now: Instant::now(),
        };
        let profiles = [profile("default")];
        let mut results = ProfileResults::default();
        assert_eq!(h.pick_profiles(&cx, &profiles, &results).as_slice(), &[0]);
        results.entries.push((0, "default".into(), None));
        assert!(h.pick_profiles(&cx, &profiles, &results).is_empty());
    }

    #[test]
    fn errors_match_the_reference() {
        let h = SingleProfileHandler::new(TYPE);
        let req = request("m");
        let cycle = CycleState::new();
        let cx = SchedulingContext {
            request: &req,
            cycle: &cycle,
            now: Instant::now(),
        };
        let failed = ProfileResults {
            entries: vec![(0, "default".into(), None)],
        };
        assert_eq!(
            h.process_results(&cx, failed).unwrap_err().to_string(),
            "failed to run scheduler profile 'default'"
        );
        let two = ProfileResults {
            entries: vec![
                (0, "a".into(), Some(ProfileRunResult::default())),
                (1, "b".into(), Some(ProfileRunResult::default())),
            ],
        };
        assert_eq!(
            h.process_results(&cx, two).unwrap_err().to_string(),
            MULTIPLE_PROFILES_MSG
        );
        let ok = ProfileResults {
            entries: vec![(
                0,
                "p".into(),
                Some(ProfileRunResult {
                    targets: vec![ep(1)],
                }),
            )],
        };
        let r = h.process_results(&cx, ok).unwrap();
        assert_eq!(r.primary_profile, "p");
        assert_eq!(r.targets()[0].name(), "pod-1");
    }

    #[test]
    fn parameters_are_rejected() {
        assert!(build_err(TYPE, serde_json::json!({"profile": "x"})).contains("unknown field"));
    }
}
