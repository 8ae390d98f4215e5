//! A live progress bar per stage on the terminal (indicatif).

use std::sync::{Arc, Mutex, PoisonError};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::runner::{ProgressCallback, ProgressEvent};

/// A [`ProgressCallback`] drawing one bar per stage on stderr. Returns `None` when stderr is not
/// a terminal, so piped and CI output stays clean.
pub fn terminal_progress() -> Option<ProgressCallback> {
    if ProgressDrawTarget::stderr().is_hidden() {
        return None;
    }
    let bars = Arc::new(StageBars::new(|| ProgressDrawTarget::stderr_with_hz(10)));
    Some(Arc::new(move |e: &ProgressEvent| bars.handle(e)))
}

/// One progress bar per stage, created from a draw-target factory.
pub struct StageBars {
    make_target: Box<dyn Fn() -> ProgressDrawTarget + Send + Sync>,
    state: Mutex<BarState>,
}

#[derive(Default)]
struct BarState {
    bar: Option<ProgressBar>,
    description: String,
    failed: u64,
}

impl StageBars {
    /// Bars drawn to targets made by `make_target` (e.g. [`ProgressDrawTarget::hidden`]).
    pub fn new(make_target: impl Fn() -> ProgressDrawTarget + Send + Sync + 'static) -> Self {
        Self {
            make_target: Box::new(make_target),
            state: Mutex::new(BarState::default()),
        }
    }

    /// Applies one event.
    pub fn handle(&self, event: &ProgressEvent) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            ProgressEvent::StageStarted {
                stage_id,
                stages,
                total_requests,
                description,
            } => {
                let pb = ProgressBar::with_draw_target(Some(*total_requests), (self.make_target)());
                let style = ProgressStyle::with_template(
                    "{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} {msg} ({elapsed_precise}, eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                pb.set_style(style);
                pb.set_prefix(format!("Stage {stage_id}/{}", stages.saturating_sub(1)));
                pb.set_message(description.clone());
                st.description.clone_from(description);
                st.failed = 0;
                st.bar = Some(pb);
            }
            ProgressEvent::RequestFinished {
                finished, failed, ..
            } => {
                let changed = *failed != st.failed;
                st.failed = *failed;
                if let Some(pb) = st.bar.as_ref() {
                    pb.set_position(*finished);
                    if changed {
                        pb.set_message(format!("{} ({failed} failed)", st.description));
                    }
                }
            }
            ProgressEvent::StageFinished { interrupted, .. } => {
                if let Some(pb) = st.bar.take() {
                    if *interrupted {
                        pb.abandon_with_message(format!("{} - interrupted", pb.message()));
                    } else {
                        pb.finish();
                    }
                }
            }
        }
    }

    /// Position and length of the current stage's bar.
    pub fn current(&self) -> Option<(u64, Option<u64>)> {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.bar.as_ref().map(|b| (b.position(), b.length()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_follow_stage_events() {
        let bars = StageBars::new(ProgressDrawTarget::hidden);
        assert_eq!(bars.current(), None);
        bars.handle(&ProgressEvent::StageStarted {
            stage_id: 0,
            stages: 2,
            total_requests: 3,
            description: "poisson 1 req/s for 3 s".into(),
        });
        assert_eq!(bars.current(), Some((0, Some(3))));
        for i in 1..=2 {
            bars.handle(&ProgressEvent::RequestFinished {
                stage_id: 0,
                finished: i,
                failed: i - 1,
                total_requests: 3,
            });
        }
        assert_eq!(bars.current(), Some((2, Some(3))));
        bars.handle(&ProgressEvent::StageFinished {
            stage_id: 0,
            finished: 2,
            failed: 1,
            interrupted: true,
        });
        assert_eq!(bars.current(), None);
    }
}
