//! Shared by the engine tests: configs, events, and a naive reference model
//! that materialises every window and applies Flink's rules literally.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use shardflow::config::Config;
use shardflow::engine::Engine;
use shardflow::record::{Event, FieldValue, Output, Position};
use shardflow::state::StateStore;
use shardflow::time::Millis;

/// Schema fields in order: `amount` (index 0), `merchant` (index 1).
pub fn config(ooo: i64, idle: i64, lateness: i64, features: &str) -> Config {
    let text = format!(
        r#"
[source]
type = "generator"

[schema]
key = "userId"
timestamp = "ts"
fields = {{ amount = "f64?", merchant = "string" }}

[watermark]
max_out_of_orderness = {ooo}
idle_timeout = {idle}
allowed_lateness = {lateness}

{features}

[[sinks]]
type = "stdout"
kinds = ["features", "window", "late"]
"#
    );
    Config::from_str_at(&text, Path::new("test.toml"), |_| None).expect("test config is valid")
}

/// Every aggregate, over three window geometries (two shared by several features).
pub const ALL_FEATURES: &str = r#"
[[features]]
name = "count_t40"
agg = "count"
window = { type = "tumbling", size = 40 }

[[features]]
name = "sum_s60"
agg = "sum"
field = "amount"
window = { type = "sliding", size = 60, slide = 20 }

[[features]]
name = "max_s60"
agg = "max"
field = "amount"
window = { type = "sliding", size = 60, slide = 20 }

[[features]]
name = "first_s60"
agg = "first"
field = "amount"
window = { type = "sliding", size = 60, slide = 20 }

[[features]]
name = "last_s60"
agg = "last"
field = "amount"
window = { type = "sliding", size = 60, slide = 20 }

[[features]]
name = "mean_t40"
agg = "mean"
field = "amount"
window = { type = "tumbling", size = 40 }

[[features]]
name = "std_s100"
agg = "stddev"
field = "amount"
window = { type = "sliding", size = 100, slide = 20 }

[[features]]
name = "min_s100"
agg = "min"
field = "amount"
window = { type = "sliding", size = 100, slide = 20 }

[[features]]
name = "count_s100"
agg = "count"
window = { type = "sliding", size = 100, slide = 20 }

[[features]]
name = "distinct_s100"
agg = "distinct_count"
field = "merchant"
window = { type = "sliding", size = 100, slide = 20 }
max_distinct = 3
"#;

/// One generated input event.
#[derive(Clone, Debug)]
pub struct In {
    pub partition: u8,
    pub seq: u32,
    pub key: u8,
    pub time: Millis,
    pub amount: Option<i32>,
    pub merchant: u8,
}

pub fn event(e: &In) -> Event {
    Event {
        position: Position::new(Arc::from(format!("p{}", e.partition)), e.seq.to_string()),
        arrival: 0,
        key: format!("k{}", e.key).into(),
        event_time: e.time,
        fields: vec![
            e.amount.map(|a| FieldValue::F64(a as f64)),
            Some(FieldValue::Str(Arc::from(format!("m{}", e.merchant)))),
        ]
        .into(),
        raw: bytes::Bytes::from(format!("{{\"ts\":{}}}", e.time)),
    }
}

pub fn open(dir: &Path, config: &Config) -> StateStore {
    StateStore::open(dir, &config.state_fingerprint(), false).expect("open state")
}

/// A comparable view of one output.
#[derive(Clone, Debug, PartialEq)]
pub enum Seen {
    Features(Vec<Option<f64>>),
    Late(Millis),
    Window(Millis, Millis, Option<f64>),
}

fn close(a: &Option<f64>, b: &Option<f64>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * (1.0 + x.abs().max(y.abs())),
        (None, None) => true,
        _ => false,
    }
}

impl Seen {
    pub fn approx_eq(&self, other: &Seen) -> bool {
        match (self, other) {
            (Seen::Features(a), Seen::Features(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| close(x, y))
            }
            (Seen::Window(s1, e1, v1), Seen::Window(s2, e2, v2)) => {
                s1 == s2 && e1 == e2 && close(v1, v2)
            }
            (a, b) => a == b,
        }
    }
}

pub fn seen(o: &Output) -> Seen {
    match o {
        Output::Features(f) => Seen::Features(
            f.features
                .values
                .iter()
                .map(|v| v.map(|v| v.as_f64()))
                .collect(),
        ),
        Output::Late(l) => Seen::Late(l.watermark),
        Output::Window(w) => {
            Seen::Window(w.window_start, w.window_end, w.value.map(|v| v.as_f64()))
        }
        other => panic!("unexpected output {other:?}"),
    }
}

/// Outputs by id; panics on an id produced twice with different content.
pub fn by_id(outputs: &[Output]) -> BTreeMap<String, Seen> {
    let mut map = BTreeMap::new();
    for o in outputs {
        let s = seen(o);
        if let Some(prev) = map.insert(o.id(), s.clone()) {
            assert!(
                prev.approx_eq(&s),
                "id {} produced twice with different content: {prev:?} vs {s:?}",
                o.id()
            );
        }
    }
    map
}

/// Asserts two id maps are equal (floats approximately).
pub fn assert_same(engine: &BTreeMap<String, Seen>, reference: &BTreeMap<String, Seen>) {
    for (id, r) in reference {
        match engine.get(id) {
            None => panic!("engine is missing {id}: {r:?}"),
            Some(e) => assert!(e.approx_eq(r), "{id}: engine {e:?}, reference {r:?}"),
        }
    }
    for (id, e) in engine {
        assert!(
            reference.contains_key(id),
            "engine produced {id} ({e:?}) that the reference did not"
        );
    }
}

// ---------------------------------------------------------------------------
// The reference model.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agg {
    Count,
    Sum,
    Min,
    Max,
    Mean,
    First,
    Last,
    Stddev,
    Distinct(usize),
}

#[derive(Clone, Debug)]
pub struct RefFeature {
    pub agg: Agg,
    pub size: i64,
    pub slide: i64,
}

pub fn ref_features(config: &Config) -> Vec<RefFeature> {
    use shardflow::config::AggKind;
    config
        .features
        .iter()
        .map(|f| {
            let w = f.window.get_ref();
            RefFeature {
                agg: match f.agg {
                    AggKind::Count => Agg::Count,
                    AggKind::Sum => Agg::Sum,
                    AggKind::Min => Agg::Min,
                    AggKind::Max => Agg::Max,
                    AggKind::Mean => Agg::Mean,
                    AggKind::First => Agg::First,
                    AggKind::Last => Agg::Last,
                    AggKind::Stddev => Agg::Stddev,
                    AggKind::DistinctCount => Agg::Distinct(f.max_distinct.unwrap_or(10_000)),
                },
                size: w.size_millis(),
                slide: w.slide_millis(),
            }
        })
        .collect()
}

#[derive(Clone, Debug)]
struct RefEvent {
    time: Millis,
    seq: u64,
    amount: Option<f64>,
    merchant: u8,
}

#[derive(Default, Debug)]
struct RefWindow {
    events: Vec<RefEvent>,
    fired: u32,
    pending: bool,
}

/// Flink's rules, literally: every window of every feature is its own object.
pub struct Reference {
    features: Vec<RefFeature>,
    names: Vec<String>,
    ooo: i64,
    idle: i64,
    lateness: i64,
    partitions: HashMap<u8, (Millis, Millis)>,
    pub watermark: Millis,
    seq: u64,
    /// (feature, key, start) → window.
    windows: BTreeMap<(usize, u8, Millis), RefWindow>,
    pub out: BTreeMap<String, Seen>,
}

impl Reference {
    pub fn new(config: &Config) -> Reference {
        Reference {
            features: ref_features(config),
            names: config
                .features
                .iter()
                .map(|f| f.name.get_ref().clone())
                .collect(),
            ooo: config.watermark.max_out_of_orderness.millis(),
            idle: config.watermark.idle_timeout.millis(),
            lateness: config.watermark.allowed_lateness.millis(),
            partitions: HashMap::new(),
            watermark: Millis::MIN,
            seq: 0,
            windows: BTreeMap::new(),
            out: BTreeMap::new(),
        }
    }

    fn purged(&self, end: Millis, w: Millis) -> bool {
        (w as i128) >= end as i128 - 1 + self.lateness as i128
    }

    /// Starts of the windows of `f` containing `t`, earliest-ending first.
    fn starts(f: &RefFeature, t: Millis) -> Vec<Millis> {
        let last = t.div_euclid(f.slide) * f.slide;
        let mut v = Vec::new();
        let mut s = last - f.size + f.slide;
        while s <= last {
            v.push(s);
            s += f.slide;
        }
        v
    }

    fn value(f: &RefFeature, start: Millis, events: &[RefEvent]) -> Option<f64> {
        let xs: Vec<&RefEvent> = events.iter().filter(|e| e.amount.is_some()).collect();
        let vals: Vec<f64> = xs.iter().map(|e| e.amount.unwrap_or_default()).collect();
        let n = vals.len() as f64;
        match f.agg {
            Agg::Count => Some(events.len() as f64),
            Agg::Sum => (!vals.is_empty()).then(|| vals.iter().sum()),
            Agg::Min => vals.iter().copied().reduce(f64::min),
            Agg::Max => vals.iter().copied().reduce(f64::max),
            Agg::Mean => (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / n),
            Agg::First => xs
                .iter()
                .min_by_key(|e| (e.time, e.seq))
                .and_then(|e| e.amount),
            Agg::Last => xs
                .iter()
                .max_by_key(|e| (e.time, e.seq))
                .and_then(|e| e.amount),
            Agg::Stddev => (!vals.is_empty()).then(|| {
                let mean = vals.iter().sum::<f64>() / n;
                (vals.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt()
            }),
            Agg::Distinct(max) => {
                // A slice (slide-aligned) with more than `max` values makes the window null.
                let mut s = start;
                while s < start + f.size {
                    let mut in_slice: Vec<u8> = events
                        .iter()
                        .filter(|e| e.time >= s && e.time < s + f.slide)
                        .map(|e| e.merchant)
                        .collect();
                    in_slice.sort();
                    in_slice.dedup();
                    if in_slice.len() > max {
                        return None;
                    }
                    s += f.slide;
                }
                let mut all: Vec<u8> = events.iter().map(|e| e.merchant).collect();
                all.sort();
                all.dedup();
                Some(all.len() as f64)
            }
        }
    }

    pub fn process(&mut self, e: &In, now: Millis) {
        let w_before = self.watermark;
        let seq = self.seq;
        self.seq += 1;
        let ev = RefEvent {
            time: e.time,
            seq,
            amount: e.amount.map(f64::from),
            merchant: e.merchant,
        };
        let id = format!("p{}/{}", e.partition, e.seq);
        // (1) + (2): add to every live window; late if there is none.
        let mut any_live = false;
        let mut vector = Vec::new();
        for fi in 0..self.features.len() {
            let f = self.features[fi].clone();
            let mut value = None;
            let mut first_live = true;
            for start in Self::starts(&f, e.time) {
                if self.purged(start + f.size, w_before) {
                    continue;
                }
                any_live = true;
                let win = self.windows.entry((fi, e.key, start)).or_default();
                win.events.push(ev.clone());
                win.pending = true;
                // (3) the earliest-ending live window, including this event.
                if first_live {
                    value = Self::value(&f, start, &win.events);
                    first_live = false;
                }
            }
            vector.push(value);
        }
        if any_live || self.features.is_empty() {
            self.out.insert(id, Seen::Features(vector));
        } else {
            self.out.insert(id, Seen::Late(w_before));
        }
        // (4)
        let p = self
            .partitions
            .entry(e.partition)
            .or_insert((Millis::MIN, now));
        p.0 = p.0.max(e.time);
        p.1 = now;
        self.advance(now);
        // (5)
        self.fire_and_purge();
    }

    fn advance(&mut self, now: Millis) {
        let active = self
            .partitions
            .values()
            .filter(|(_, seen)| now - seen < self.idle)
            .map(|(max, _)| max.saturating_sub(self.ooo).saturating_sub(1))
            .min();
        if let Some(w) = active {
            self.watermark = self.watermark.max(w);
        }
    }

    pub fn tick(&mut self, now: Millis) {
        self.advance(now);
        self.fire_and_purge();
    }

    pub fn finish(&mut self) {
        self.watermark = Millis::MAX;
        self.fire_and_purge();
    }

    fn fire_and_purge(&mut self) {
        let w = self.watermark;
        let mut fired = Vec::new();
        for ((fi, key, start), win) in self.windows.iter_mut() {
            let f = &self.features[*fi];
            let end = start + f.size;
            if win.pending && (w as i128) >= end as i128 - 1 {
                let id = format!("{}/k{}/{}/{}", self.names[*fi], key, end, win.fired);
                fired.push((
                    id,
                    Seen::Window(*start, end, Self::value(f, *start, &win.events)),
                ));
                win.fired += 1;
                win.pending = false;
            }
        }
        for (id, s) in fired {
            assert!(
                self.out.insert(id.clone(), s).is_none(),
                "reference fired {id} twice"
            );
        }
        let lateness = self.lateness;
        let features = &self.features;
        self.windows.retain(|(fi, _, start), _| {
            (w as i128) < (start + features[*fi].size) as i128 - 1 + lateness as i128
        });
    }
}

/// One step of a scenario.
#[derive(Clone, Debug)]
pub enum Step {
    Event(In),
    /// Processing time advances by this much and the engine ticks.
    Tick(i64),
    /// A checkpoint barrier: snapshot now; the commit follows at once, or
    /// (`deferred`) only at the next barrier, as when sinks are slow.
    Checkpoint {
        deferred: bool,
    },
}

/// Drives an engine through steps, committing checkpoints like the pipeline.
pub struct Driver {
    pub engine: Engine,
    pub store: StateStore,
    pub now: Millis,
    pub next_checkpoint: u64,
    /// Snapshots awaiting their commit, with the positions of their barrier.
    queued: Vec<(u64, shardflow::state::StateDelta, Vec<Position>)>,
    /// Where the input is: the position of the last event processed.
    pub last_position: Vec<Position>,
}

impl Driver {
    pub fn new(engine: Engine, store: StateStore, now: Millis) -> Driver {
        let next_checkpoint = store.committed_checkpoint().expect("checkpoint") + 1;
        // Like a source, the input resumes at the committed positions.
        let last_position = store.committed_positions().expect("positions");
        Driver {
            engine,
            store,
            now,
            next_checkpoint,
            queued: Vec::new(),
            last_position,
        }
    }

    pub fn step(&mut self, step: &Step, out: &mut Vec<Output>) {
        match step {
            Step::Event(e) => {
                self.now += 1;
                let ev = event(e);
                self.last_position = vec![ev.position.clone()];
                // As the pipeline does; a hint that must change nothing.
                self.engine.prefetch([&*ev.key]);
                self.engine.process(&ev, self.now, out).expect("process");
            }
            Step::Tick(d) => {
                self.now += d;
                self.engine.on_tick(self.now, out).expect("tick");
            }
            Step::Checkpoint { deferred } => {
                let id = self.next_checkpoint;
                self.next_checkpoint += 1;
                let delta = self.engine.snapshot(id).expect("snapshot");
                self.queued.push((id, delta, self.last_position.clone()));
                if !deferred {
                    self.commit_queued();
                }
            }
        }
    }

    pub fn commit_queued(&mut self) {
        let mut last = None;
        for (id, delta, positions) in self.queued.drain(..) {
            self.store.commit(id, delta, &positions).expect("commit");
            last = Some(id);
        }
        if let Some(id) = last {
            self.engine.committed(id);
        }
    }
}

pub fn run_reference(reference: &mut Reference, steps: &[Step], now: &mut Millis) {
    for step in steps {
        match step {
            Step::Event(e) => {
                *now += 1;
                reference.process(e, *now);
            }
            Step::Tick(d) => {
                *now += d;
                reference.tick(*now);
            }
            Step::Checkpoint { .. } => {}
        }
    }
}
