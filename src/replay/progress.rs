//! Replay progress on stderr: an indicatif bar on a terminal (objects,
//! bytes, events, events/s, ETA by bytes), a plain line every
//! `progress_interval` otherwise (logs, CI).

use std::io::IsTerminal as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::flow::Stats;
use crate::source::s3::ArchiveProgress;

pub struct Display {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Display {
    /// Draws a last time and stops.
    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Starts the display for this replay.
pub fn spawn(progress: Arc<ArchiveProgress>, stats: Arc<Stats>, every: Duration) -> Display {
    let (stop, mut stopped) = oneshot::channel();
    let terminal = std::io::stderr().is_terminal();
    let task = tokio::spawn(async move {
        let started = Instant::now();
        let bar = terminal.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} · {msg} · ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        let tick = if terminal {
            Duration::from_millis(200)
        } else {
            every.max(Duration::from_millis(200))
        };
        loop {
            let done = tokio::select! {
                _ = tokio::time::sleep(tick) => false,
                _ = &mut stopped => true,
            };
            let line = status(&progress, &stats, started);
            match &bar {
                Some(bar) => {
                    if progress.listed.load(Ordering::Relaxed) {
                        bar.set_length(progress.bytes_total.load(Ordering::Relaxed));
                    }
                    bar.set_position(progress.bytes_done.load(Ordering::Relaxed));
                    bar.set_message(line);
                    if done {
                        bar.finish();
                    }
                }
                None => eprintln!("[{:>5.0}s] replay: {line}", started.elapsed().as_secs_f64()),
            }
            if done {
                return;
            }
        }
    });
    Display { stop, task }
}

fn status(p: &ArchiveProgress, stats: &Stats, started: Instant) -> String {
    let events = stats.events.load(Ordering::Relaxed);
    let rate = events as f64 / started.elapsed().as_secs_f64().max(1e-3);
    let mut line = format!(
        "objects {}/{} · events {events} ({rate:.0}/s)",
        p.objects_done.load(Ordering::Relaxed),
        p.objects_total.load(Ordering::Relaxed),
    );
    if !std::io::stderr().is_terminal() {
        line.push_str(&format!(
            " · {} of {} bytes",
            p.bytes_done.load(Ordering::Relaxed),
            p.bytes_total.load(Ordering::Relaxed)
        ));
    }
    let dead = stats.dead_letters.load(Ordering::Relaxed);
    if dead > 0 {
        line.push_str(&format!(" · dead letters {dead}"));
    }
    let bad = p.bad_objects.load(Ordering::Relaxed);
    if bad > 0 {
        line.push_str(&format!(" · bad objects {bad}"));
    }
    line
}
