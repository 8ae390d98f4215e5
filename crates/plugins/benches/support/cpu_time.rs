//! A criterion measurement of the benchmark thread's CPU time
//! (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`), so results stay meaningful on a machine shared
//! with other CPU-heavy work: time the thread spends preempted is not counted. Cache and
//! memory-bandwidth interference from the neighbours still is.
//!
//! Select wall-clock time instead with `BENCH_CLOCK=wall`.

use criterion::Throughput;
use criterion::measurement::{Measurement, ValueFormatter};

#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

const CLOCK_THREAD_CPUTIME_ID: i32 = 3;

unsafe extern "C" {
    fn clock_gettime(clk: i32, ts: *mut Timespec) -> i32;
}

/// Nanoseconds of CPU time consumed by the calling thread.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a Linux constant.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
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

/// True when `BENCH_CLOCK=wall`.
pub fn wall_clock_requested() -> bool {
    std::env::var("BENCH_CLOCK").is_ok_and(|v| v == "wall")
}
