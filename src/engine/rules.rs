//! When a window fires, when it is purged, and when an event is late. This
//! module is the one place where these rules are written down.
//!
//! shardflow uses Flink's event-time semantics (`EventTimeTrigger` and
//! `WindowOperator`). The rest of the engine asks the functions below. No
//! other code compares a watermark with a window end.
//!
//! # Terms
//!
//! * A **window** is half-open, `[s, e)`, in event-time milliseconds. Its
//!   last instant is `e − 1` (Flink's `maxTimestamp`).
//! * **`W`** is the pipeline watermark ([`Watermarks`]). An event is judged
//!   against `W` as it was *before* that event.
//! * **`L`** is `allowed_lateness`, in milliseconds, and is never negative
//!   (config refuses a negative duration).
//!
//! # The rules
//!
//! 1. **Firing** ([`fires`]): window `[s, e)` fires when `W ≥ e − 1`. A
//!    window fires once. If it holds events (and a sink takes window
//!    results) it emits its results with revision 0. An empty window
//!    emits nothing.
//! 2. **Purging** ([`purged`]): window `[s, e)` is purged when
//!    `W ≥ e − 1 + L`. Its state is dropped, and no event can change it
//!    again. Because `L ≥ 0`, a window fires no later than it is purged.
//!    With `L = 0`, both happen at the same watermark, and firing comes
//!    first.
//! 3. **Lateness** ([`late`]): within one window spec, an event is late
//!    when *every* window containing it is purged. Windows are purged in
//!    the order of their ends, so this holds exactly when the window
//!    containing it that ends last is purged. The event is late for the
//!    engine when it is late in every spec. It then goes to the `late`
//!    output with `W`, and it changes no state. An event that is late in
//!    some specs only updates the others.
//! 4. **Re-firing** ([`refired`]): an accepted event that falls into
//!    windows that have fired but are not yet purged fires each of them
//!    again. This happens right after the event, before anything that the
//!    event's own watermark advance makes due. Each emission of a window
//!    carries the revision after its previous one ([`next_revision`]: 1
//!    for the first re-firing, then 2, …), and the numbering survives a
//!    restore.
//! 5. **End of input**: a bounded input ends with `W = i64::MAX`. Then
//!    every window fires and all state is purged. The few windows whose
//!    ends do not fit in an `i64` are the exception (see below).
//!
//! # Timers
//!
//! The operator schedules work for a key with a timer whose value is an
//! instant `at`. For firing, `at` is a window end `e`. For purging, it is
//! [`purge_at`]`(e, L) = e + L`. A timer is [`due`] when `W ≥ at − 1`. That
//! single comparison serves the timer loop and both purge loops (slices
//! and revisions).
//!
//! # Windows by index
//!
//! The engine's windows are aligned to the epoch. Window `j` of a spec ends
//! at `(j + 1) · slide`, with `slide ≥ 1` ([`Geometry`]). [`last_due_window`] and
//! [`first_live_window`] are rules 1 and 2 solved for `j`:
//! window `j` has fired iff `j ≤ last_due_window`, and it is purged iff
//! `j < first_live_window`. [`late`] and [`refired`] are rules 3 and 4 in
//! that form.
//!
//! # At the ends of `i64`
//!
//! Nothing here panics or wraps. Arithmetic saturates as follows:
//!
//! * The comparison `W ≥ at − 1` is exact for every `i64`. [`due`]
//!   computes `at − 1` with saturation, which only clamps when
//!   `at = i64::MIN`, and in that case `W ≥ at − 1` holds for every `W`
//!   anyway.
//! * A time too large for an `i64` is stored as `i64::MAX`. This applies to
//!   a window end ([`Geometry::end_of`]) and to a purge time `e + L`
//!   ([`purge_at`]). A timer at `i64::MAX` is due once `W ≥ i64::MAX − 1`.
//! * The index forms are computed exactly, in `i128`, and only the
//!   resulting index is clamped to `i64`. Suppose a window's true end
//!   `(j + 1) · slide` lies past `i64::MAX`. Only events within one slide
//!   of `i64::MAX` (some 292 million years after 1970) fall into such a
//!   window. Its clamped timer, and its clamped purge time, are due at
//!   `W ≥ i64::MAX − 1`. By index, however, it fires only if its true end
//!   is exactly `i64::MAX + 1` (`slide` a power of two) and the key's visit
//!   happens at `W = i64::MAX`. Otherwise the visit purges its state
//!   without firing it.
//! * `first_live_window` clamps at `i64::MAX`. So with `slide = 1`,
//!   `L = 0` and `W = i64::MAX`, an event at `i64::MAX` is still accepted.
//! * At the lowest watermark, `W = i64::MIN` (no partition has delivered
//!   yet), only a window ending at `i64::MIN + 1` is due. With `slide = 1`
//!   and `L = 0`, that makes an event at `i64::MIN` late at once, as
//!   Flink would.
//!
//! [`Watermarks`]: super::Watermarks
//! [`Geometry`]: super::Geometry
//! [`Geometry::end_of`]: super::Geometry::end_of

use std::ops::RangeInclusive;

/// Clamps an exact (`i128`) time or window index to `i64`: window ends and
/// starts ([`Geometry`](super::Geometry)) and the index forms below.
#[inline]
pub(super) fn saturate(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// Whether a timer set for instant `at` is due at watermark `w`:
/// `w ≥ at − 1`. This is exact for every `i64`.
#[inline]
pub fn due(at: i64, w: i64) -> bool {
    at.saturating_sub(1) <= w
}

/// Rule 1: window `[s, end)` fires at watermark `w` when `w ≥ end − 1`.
#[inline]
pub fn fires(end: i64, w: i64) -> bool {
    due(end, w)
}

/// The timer instant at which window `[s, end)` is purged: `end + lateness`,
/// clamped to `i64::MAX`. It is due when `w ≥ end − 1 + lateness`.
#[inline]
pub fn purge_at(end: i64, lateness: i64) -> i64 {
    end.saturating_add(lateness)
}

/// Rule 2: window `[s, end)` is purged at watermark `w` when
/// `w ≥ end − 1 + lateness`.
#[inline]
pub fn purged(end: i64, lateness: i64, w: i64) -> bool {
    due(purge_at(end, lateness), w)
}

/// The largest window index that has fired at watermark `w`, for windows
/// ending at `(j + 1) · slide`. This is rule 1 solved for `j`:
/// `(j + 1) · slide ≤ w + 1`.
#[inline]
pub fn last_due_window(slide: i64, w: i64) -> i64 {
    // In i64 when nothing overflows (every watermark but the last instant):
    // the same quotient, without a 128-bit division per event.
    match w.checked_add(1) {
        Some(x) if slide > 0 => x.div_euclid(slide).saturating_sub(1),
        _ => saturate((w as i128 + 1).div_euclid(slide as i128) - 1),
    }
}

/// The smallest window index not purged at watermark `w`, for windows
/// ending at `(j + 1) · slide`. This is rule 2 solved for `j`:
/// `(j + 1) · slide > w + 1 − lateness`.
#[inline]
pub fn first_live_window(slide: i64, lateness: i64, w: i64) -> i64 {
    match w.checked_add(1).and_then(|x| x.checked_sub(lateness)) {
        Some(x) if slide > 0 => x.div_euclid(slide),
        _ => saturate((w as i128 + 1 - lateness as i128).div_euclid(slide as i128)),
    }
}

/// Rule 3 within one spec: an event whose windows end, the last of them, at
/// index `last_window` is late at `w` when that window is purged. The
/// earlier windows are then purged too.
#[inline]
pub fn late(last_window: i64, slide: i64, lateness: i64, w: i64) -> bool {
    last_window < first_live_window(slide, lateness, w)
}

/// Rule 4: given the windows `windows` that contain an accepted event, the
/// first window not purged `first_live`, and the firing cursor `fired`
/// (every window `≤ fired` has fired), returns the windows the event
/// re-fires. These are the fired windows that are not purged. The range is
/// empty when there are none.
#[inline]
pub fn refired(windows: RangeInclusive<i64>, first_live: i64, fired: i64) -> RangeInclusive<i64> {
    (*windows.start()).max(first_live)..=(*windows.end()).min(fired)
}

/// The revision an emission carries after one with `revision`: the next
/// number, saturating at `u32::MAX`. A window's first emission carries 0.
#[inline]
pub fn next_revision(revision: u32) -> u32 {
    revision.saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: i64 = i64::MAX;
    const MIN: i64 = i64::MIN;

    /// The i64 paths of the index forms give what the exact 128-bit
    /// arithmetic gives, at the extremes and on scattered values.
    #[test]
    fn index_forms_equal_their_exact_128_bit_values() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as i64
        };
        let mut values = vec![MIN, MIN + 1, -2, -1, 0, 1, 2, 59_999, 60_000, MAX - 1, MAX];
        values.extend((0..40).map(|_| next()));
        values.extend((0..40).map(|_| next() % 10_000_000));
        for &slide in &[1, 2, 7, 10_000, 60_000, 3_600_000, MAX] {
            for &w in &values {
                let exact = saturate((w as i128 + 1).div_euclid(slide as i128) - 1);
                assert_eq!(last_due_window(slide, w), exact, "slide {slide}, w {w}");
                for &lateness in &values {
                    let exact =
                        saturate((w as i128 + 1 - lateness as i128).div_euclid(slide as i128));
                    assert_eq!(
                        first_live_window(slide, lateness, w),
                        exact,
                        "slide {slide}, lateness {lateness}, w {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn fires_exactly_at_end_minus_one() {
        // [0, 60)
        assert!(!fires(60, 58));
        assert!(fires(60, 59));
        assert!(fires(60, 60));
        assert!(!fires(0, -2));
        assert!(fires(0, -1));
    }

    #[test]
    fn purged_at_end_minus_one_plus_lateness() {
        assert!(!purged(60, 10, 68));
        assert!(purged(60, 10, 69));
        // Lateness 0: purged at the instant it fires, never before.
        for w in [57, 58, 59, 60] {
            assert_eq!(purged(60, 0, w), fires(60, w), "w = {w}");
        }
        assert_eq!(purge_at(60, 10), 70);
        // Firing never comes after purging.
        for lateness in [0, 1, 45] {
            for w in 50..80 {
                assert!(!purged(60, lateness, w) || fires(60, w));
            }
        }
    }

    #[test]
    fn due_is_exact_at_the_extremes() {
        // `at − 1` saturates only at i64::MIN, which is due at any watermark.
        for w in [MIN, MIN + 1, 0, MAX] {
            assert!(due(MIN, w));
        }
        assert!(due(MIN + 1, MIN));
        assert!(!due(MIN + 2, MIN));
        assert!(!due(MAX, MAX - 2));
        assert!(due(MAX, MAX - 1));
        assert!(due(MAX, MAX));
    }

    #[test]
    fn purge_times_saturate() {
        assert_eq!(purge_at(MAX - 5, 10), MAX);
        assert!(!purged(MAX - 5, 10, MAX - 2));
        assert!(purged(MAX - 5, 10, MAX - 1));
        // At end of input (W = i64::MAX) every window is purged, whatever
        // its lateness.
        for (end, lateness) in [(MAX, 0), (MAX, MAX), (0, MAX), (MIN + 1, 5)] {
            assert!(purged(end, lateness, MAX), "end {end}, lateness {lateness}");
        }
    }

    #[test]
    fn index_forms_agree_with_the_rules() {
        for slide in [1i64, 3, 20] {
            for lateness in [0i64, 1, 7, 45] {
                for w in -130..130 {
                    for j in -20..20 {
                        let end = (j + 1) * slide;
                        assert_eq!(
                            j <= last_due_window(slide, w),
                            fires(end, w),
                            "slide {slide}, w {w}, j {j}"
                        );
                        assert_eq!(
                            j < first_live_window(slide, lateness, w),
                            purged(end, lateness, w),
                            "slide {slide}, lateness {lateness}, w {w}, j {j}"
                        );
                        assert_eq!(late(j, slide, lateness, w), purged(end, lateness, w));
                    }
                }
            }
        }
    }

    #[test]
    fn index_forms_at_the_extremes() {
        assert_eq!(last_due_window(20, MAX), MAX / 20 - 1);
        // True end 2^63 = i64::MAX + 1: fires only at W = i64::MAX.
        assert_eq!(last_due_window(1, MAX), MAX);
        assert_eq!(last_due_window(1, MAX - 1), MAX - 1);
        assert_eq!(last_due_window(1 << 10, MAX), (1 << 53) - 1);
        // An index past i64::MAX clamps.
        assert_eq!(first_live_window(1, 0, MAX), MAX);
        assert!(!late(MAX, 1, 0, MAX));
        assert!(late(MAX - 1, 1, 0, MAX));
        // The lowest watermark: only [i64::MIN, i64::MIN + 1) is due.
        assert_eq!(last_due_window(1, MIN), MIN);
        assert_eq!(first_live_window(1, 0, MIN), MIN + 1);
        assert!(late(MIN, 1, 0, MIN));
        assert!(!late(MIN, 1, 1, MIN));
        assert!(!late(MIN + 1, 1, 0, MIN));
        assert_eq!(last_due_window(20, MIN), (MIN + 1).div_euclid(20) - 1);
        // An index below i64::MIN clamps.
        assert_eq!(first_live_window(1, MAX, MIN), MIN);
    }

    #[test]
    fn late_when_the_last_window_is_purged() {
        // Windows of 60 sliding by 20: an event at 0 is in windows 0, 1, 2
        // (window 2 = [0, 60)), purged at 59 + 10.
        assert!(!late(2, 20, 10, 68));
        assert!(late(2, 20, 10, 69));
        // Lateness 0: late once its last window has fired.
        assert!(!late(2, 20, 0, 58));
        assert!(late(2, 20, 0, 59));
    }

    #[test]
    fn refires_the_fired_windows_not_purged() {
        // Event in windows 5..=7, window 6 is the first live one, 6 fired.
        assert_eq!(refired(5..=7, 6, 6), 6..=6);
        assert_eq!(refired(5..=7, 0, 9), 5..=7);
        // Nothing has fired yet, or everything fired is purged.
        assert!(refired(5..=7, 0, 4).is_empty());
        assert!(refired(5..=7, 6, 5).is_empty());
        assert!(refired(5..=7, 0, MIN).is_empty());
        assert_eq!(next_revision(0), 1);
        assert_eq!(next_revision(u32::MAX), u32::MAX);
    }
}
