//! Criterion helpers shared by llmsched's benchmarks.
//!
//! [`CpuTime`] measures the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), so
//! results stay meaningful on a machine shared with other CPU-heavy work: time the thread
//! spends preempted is not counted. Cache and memory-bandwidth interference from the
//! neighbours still is. [`run`] runs a [`Suite`] with it, or with wall-clock time when
//! `BENCH_CLOCK=wall`.
//!
//! [`ProcessCpuTime`] counts every thread of the process instead: the measure for benches
//! whose work runs on other threads than the benchmark loop's (a loopback client and server
//! on a tokio runtime), run with [`run_process`].
//!
//! [`Case`]s are benchmarks as named closures: [`bench_cases`] runs them under criterion and,
//! with `BENCH_ITERS=N`, [`run_counted`] runs each a fixed number of times without criterion,
//! for an instruction counter (`valgrind --tool=callgrind`): two counts with different `N`
//! give the instructions per iteration, which the neighbours' load does not change.
//!
//! [`bench_main!`] writes a bench file's `main` (the shared [`config`], a [`Suite`] over the
//! file's benchmark function, [`run`] or, with `clock = process`, [`run_process`]); [`Lcg`] is the small deterministic generator the
//! benches build their fixtures from.

use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{Criterion, Throughput};

pub use criterion;

/// The criterion settings every bench uses: 0.5 s warm-up, `measurement` of measurement,
/// 30 samples.
pub fn config(measurement: Duration) -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(measurement)
        .sample_size(30)
}

/// Writes `main` for a bench file whose benchmarks are registered by one function
/// `fn bench<M: Measurement>(c: &mut Criterion<M>)`: [`config`] with the given measurement
/// time in seconds (default 2), that function as the [`Suite`], and [`run`].
///
/// ```ignore
/// fn bench<M: Measurement>(c: &mut Criterion<M>) { /* c.benchmark_group(...) */ }
/// llmsched_benchkit::bench_main!(bench);               // 2 s of measurement
/// llmsched_benchkit::bench_main!(bench, seconds = 3);
/// llmsched_benchkit::bench_main!(bench, seconds = 3, clock = process); // every thread's CPU
/// ```
#[macro_export]
macro_rules! bench_main {
    ($bench:path) => {
        $crate::bench_main!($bench, seconds = 2);
    };
    ($bench:path, seconds = $secs:expr) => {
        $crate::bench_main!(@with $bench, $secs, $crate::run);
    };
    ($bench:path, seconds = $secs:expr, clock = process) => {
        $crate::bench_main!(@with $bench, $secs, $crate::run_process);
    };
    (@with $bench:path, $secs:expr, $run:path) => {
        /// The benchmarks of this file.
        struct Benches;

        impl $crate::Suite for Benches {
            fn run<M: $crate::criterion::measurement::Measurement>(
                &self,
                c: &mut $crate::criterion::Criterion<M>,
            ) {
                $bench(c);
            }
        }

        fn main() {
            $run(
                $crate::config(::std::time::Duration::from_secs($secs)),
                &Benches,
            );
        }
    };
}

/// A 64-bit linear congruential generator (Knuth's MMIX constants): deterministic fixture
/// data for benches, not statistics.
#[derive(Debug, Clone)]
pub struct Lcg(pub u64);

impl Lcg {
    /// Advances the state and returns it (callers mix the bits as they need).
    pub fn step(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }

    /// The next value, with the high bits folded into the low ones (`x ^ (x >> 31)`).
    pub fn next_u64(&mut self) -> u64 {
        let x = self.step();
        x ^ (x >> 31)
    }
}

/// Nanoseconds of CPU time consumed by the calling thread.
pub fn thread_cpu_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000_000 + nanos
}

/// Nanoseconds of CPU time consumed by every thread of the process.
pub fn process_cpu_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000_000 + nanos
}

/// True when `BENCH_CLOCK=wall`.
pub fn wall_clock_requested() -> bool {
    std::env::var("BENCH_CLOCK").is_ok_and(|v| v == "wall")
}

/// A benchmark suite, run with whichever measurement [`run`] picks.
pub trait Suite {
    /// Registers and runs the benchmarks on `c`.
    fn run<M: Measurement>(&self, c: &mut Criterion<M>);
}

/// Runs `suite` with thread CPU time (or wall-clock time when `BENCH_CLOCK=wall`), honouring
/// criterion's command-line arguments, then prints criterion's summary.
pub fn run(config: Criterion, suite: &impl Suite) {
    if wall_clock_requested() {
        let mut c = config.configure_from_args();
        suite.run(&mut c);
        c.final_summary();
    } else {
        let mut c = config.with_measurement(CpuTime).configure_from_args();
        suite.run(&mut c);
        c.final_summary();
    }
}

/// One benchmark: `group/name`, the bytes one iteration moves (criterion's throughput), and
/// the iteration itself (its result is kept from the optimiser).
pub struct Case<'a> {
    /// Criterion group.
    pub group: &'static str,
    /// Name within the group.
    pub name: String,
    /// Bytes per iteration, if a throughput is reported.
    pub bytes: Option<u64>,
    /// One iteration.
    pub run: Box<dyn FnMut() -> usize + 'a>,
}

impl Case<'_> {
    /// `group/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.group, self.name)
    }
}

/// Runs every case under criterion, consecutive cases of one group in one benchmark group.
pub fn bench_cases<M: Measurement>(c: &mut Criterion<M>, cases: &mut [Case<'_>]) {
    let mut i = 0;
    while i < cases.len() {
        let group_name = cases[i].group;
        let mut group = c.benchmark_group(group_name);
        while i < cases.len() && cases[i].group == group_name {
            let case = &mut cases[i];
            if let Some(b) = case.bytes {
                group.throughput(Throughput::Bytes(b));
            }
            let run = &mut case.run;
            group.bench_function(case.name.as_str(), |b| b.iter(&mut *run));
            i += 1;
        }
        group.finish();
    }
}

/// `BENCH_ITERS=N`: the fixed iteration count of [`run_counted`].
pub fn iterations_requested() -> Option<u64> {
    std::env::var("BENCH_ITERS").ok()?.trim().parse().ok()
}

/// Runs `n` iterations of every case whose `group/name` contains `filter` (all when `None`),
/// without criterion, printing each case's id. Under `valgrind --tool=callgrind`, two runs
/// with different `n` give a case's instructions per iteration (their difference over the
/// difference of `n`), setup excluded.
pub fn run_counted(cases: &mut [Case<'_>], n: u64, filter: Option<&str>) {
    for case in cases.iter_mut() {
        let id = case.id();
        if filter.is_some_and(|f| !id.contains(f)) {
            continue;
        }
        let mut kept = 0usize;
        for _ in 0..n {
            kept = kept.wrapping_add(std::hint::black_box((case.run)()));
        }
        println!("{id}: {n} iterations ({kept})");
    }
}

/// Runs `suite` as [`run`] does, but measured with the whole process's CPU time
/// ([`ProcessCpuTime`]; wall-clock time when `BENCH_CLOCK=wall`).
pub fn run_process(config: Criterion, suite: &impl Suite) {
    if wall_clock_requested() {
        let mut c = config.configure_from_args();
        suite.run(&mut c);
        c.final_summary();
    } else {
        let mut c = config
            .with_measurement(ProcessCpuTime)
            .configure_from_args();
        suite.run(&mut c);
        c.final_summary();
    }
}

/// Thread CPU time, in nanoseconds.
pub struct CpuTime;

impl Measurement for CpuTime {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns().saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

/// CPU time of every thread of the process, in nanoseconds. Counts whatever else the
/// process runs meanwhile, so a bench measured with it must keep the process otherwise idle.
pub struct ProcessCpuTime;

impl Measurement for ProcessCpuTime {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        process_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        process_cpu_ns().saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

struct CpuFormatter;

impl CpuFormatter {
    fn unit(typical: f64) -> (f64, &'static str) {
        if typical < 1e3 {
            (1.0, "ns(cpu)")
        } else if typical < 1e6 {
            (1e-3, "µs(cpu)")
        } else if typical < 1e9 {
            (1e-6, "ms(cpu)")
        } else {
            (1e-9, "s(cpu)")
        }
    }
}

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (f, u) = Self::unit(typical);
        for v in values {
            *v *= f;
        }
        u
    }
    fn scale_throughputs(
        &self,
        _typical: f64,
        throughput: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let per = match throughput {
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) => *n as f64,
            Throughput::Elements(n) => *n as f64,
            _ => 1.0,
        };
        for v in values {
            *v = per / (*v * 1e-9);
        }
        "units/s(cpu)"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_cpu_time_counts_other_threads() {
        let spin = || {
            let mut x = 0u64;
            for i in 0..20_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            x
        };
        let (p0, t0) = (process_cpu_ns(), thread_cpu_ns());
        let x = std::thread::spawn(spin).join().unwrap_or(0);
        let (process, thread) = (process_cpu_ns() - p0, thread_cpu_ns() - t0);
        // The spawned thread's work shows in the process's time, not in this thread's.
        assert!(process > thread + 1_000_000, "{process} vs {thread} ({x})");
    }

    #[test]
    fn thread_cpu_time_advances_with_work_only() {
        let start = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        let busy = thread_cpu_ns() - start;
        assert!(busy > 0, "{x}");
        let before_sleep = thread_cpu_ns();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let slept = thread_cpu_ns() - before_sleep;
        // Sleeping costs (almost) no CPU: far less than the 50 ms that passed.
        assert!(slept < 25_000_000, "sleeping counted {slept} ns of CPU");
    }

    #[test]
    fn lcg_is_deterministic_and_mixes() {
        let mut a = Lcg(42);
        let mut b = Lcg(42);
        let xs: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..4).map(|_| b.next_u64()).collect::<Vec<_>>());
        // One step is the MMIX recurrence.
        let mut c = Lcg(1);
        assert_eq!(
            c.step(),
            6364136223846793005u64.wrapping_add(1442695040888963407)
        );
        assert_eq!(Lcg(1).next_u64(), c.0 ^ (c.0 >> 31));
        assert_ne!(xs[0], xs[1]);
    }

    #[test]
    fn units_follow_magnitude() {
        assert_eq!(CpuFormatter::unit(500.0).1, "ns(cpu)");
        assert_eq!(CpuFormatter::unit(5e4).1, "µs(cpu)");
        assert_eq!(CpuFormatter::unit(5e7).1, "ms(cpu)");
        assert_eq!(CpuFormatter::unit(5e9).1, "s(cpu)");
    }
}
