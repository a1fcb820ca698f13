//! The process's CPU clock for benches that report CPU time (records per
//! CPU-second): `#[path = "support/cpu.rs"] mod cpu;` (a module of each
//! bench, not a bench of its own). Linux-first; macOS has the same clock.

#![allow(dead_code)] // each bench uses what it needs

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::Throughput;

/// CPU time of the whole process (all threads, including those that have
/// exited), in nanoseconds.
pub fn process_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The process's CPU time split into user and system (kernel) time, in
/// nanoseconds (microsecond resolution).
///
/// Worth reporting apart on a VM: the system time of the same run moves by
/// a factor of three or more with what the host does with the guest's
/// free memory (a page the guest freed and the host took back costs a
/// host fault on its next first touch, inside the guest's page fault or
/// page-cache write), while the user time holds within a few per cent.
pub fn process_user_system_ns() -> (u64, u64) {
    // SAFETY: all zeros is a valid `struct rusage` (integers only).
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable `struct rusage`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    assert_eq!(rc, 0, "getrusage(RUSAGE_SELF) failed");
    let ns = |t: &libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    (ns(&u.ru_utime), ns(&u.ru_stime))
}

/// CPU time of the live threads named `name`, in nanoseconds (Linux:
/// /proc/self/task/*/schedstat), or `None` where /proc cannot tell.
pub fn threads_cpu_ns(name: &str) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // exited meanwhile
        };
        if comm.trim_end() != name {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Criterion measurement: process CPU time instead of wall time, so that
/// a throughput reads as records per CPU-second.
pub struct ProcessCpu;

impl Measurement for ProcessCpu {
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

pub struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (div, unit) = if typical < 1e3 {
            (1.0, "ns CPU")
        } else if typical < 1e6 {
            (1e3, "µs CPU")
        } else if typical < 1e9 {
            (1e6, "ms CPU")
        } else {
            (1e9, "s CPU")
        };
        values.iter_mut().for_each(|v| *v /= div);
        unit
    }

    fn scale_throughputs(
        &self,
        typical: f64,
        throughput: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let (n, units) = match *throughput {
            Throughput::Elements(n) => (n, ["rec/CPU-s", "Krec/CPU-s", "Mrec/CPU-s"]),
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) => {
                (n, ["B/CPU-s", "KB/CPU-s", "MB/CPU-s"])
            }
            Throughput::Bits(n) => (n, ["b/CPU-s", "Kb/CPU-s", "Mb/CPU-s"]),
        };
        let per_s = n as f64 * 1e9 / typical;
        let (div, unit) = if per_s < 1e3 {
            (1.0, units[0])
        } else if per_s < 1e6 {
            (1e3, units[1])
        } else {
            (1e6, units[2])
        };
        values
            .iter_mut()
            .for_each(|v| *v = n as f64 * 1e9 / *v / div);
        unit
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}
