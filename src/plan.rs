//! Turns a run of decoded, routed events into set-based writes: one INSERT per destination table
//! and column set, and in keep_latest one DELETE per table and key shape, after collapsing all
//! versions of a key to the last one. Pure Rust: the collapse is checked against a one-by-one
//! reference in the unit tests.

#[cfg(test)]
use crate::decode::Encoded;
use crate::decode::{Op, Row};
use crate::mode::Mode;
use std::borrow::Cow;
use std::collections::HashMap;
use std::rc::Rc;

/// One event, decoded and routed. `dest` indexes the batch's list of partitions; `pkey` is shared
/// by all events that carried the same ev_type.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    pub ev_id: i64,
    pub op: Op,
    pub dest: usize,
    pub pkey: Rc<Vec<String>>,
    pub row: Row<'a>,
}

type Value<'a> = Option<Cow<'a, str>>;

impl<'a> Change<'a> {
    /// The key's values in `pkey` order; callers have checked every key column is in the row.
    pub fn key_values(&self) -> Vec<Value<'a>> {
        self.pkey
            .iter()
            .map(|k| self.row.iter().find(|(c, _)| c == k).and_then(|(_, v)| v.map(|e| e.decoded())))
            .collect()
    }

    fn same_columns(&self, other: &Change) -> bool {
        self.row.len() == other.row.len() && self.row.iter().zip(&other.row).all(|((a, _), (b, _))| a == b)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeleteGroup<'a> {
    pub dest: usize,
    pub key_columns: Rc<Vec<String>>,
    /// One entry per key, values in key_columns order.
    pub keys: Vec<Vec<Value<'a>>>,
    pub ev_ids: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InsertGroup {
    pub dest: usize,
    /// Indexes into the changes slice, in event order; all these rows have the same columns.
    pub rows: Vec<usize>,
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan<'a> {
    pub deletes: Vec<DeleteGroup<'a>>,
    pub inserts: Vec<InsertGroup>,
}

/// keep_all: every I/U becomes an inserted row (D is refused before planning).
/// keep_latest: every key touched is deleted, then the last version of each key whose last event
/// is I/U is inserted; this leaves the same rows as applying the events one by one.
pub fn plan<'a>(changes: &[Change<'a>], mode: Mode) -> Plan<'a> {
    let mut plan = Plan::default();
    let survivors: Vec<usize> = if mode.keeps_every_version() {
        (0..changes.len()).filter(|&i| changes[i].op != Op::Delete).collect()
    } else {
        type Key<'k, 'a> = (usize, &'k [String], Vec<Value<'a>>);
        let mut last: HashMap<Key, usize> = HashMap::with_capacity(changes.len());
        let mut order: Vec<Key> = Vec::new();
        for (i, ch) in changes.iter().enumerate() {
            let key = (ch.dest, ch.pkey.as_slice(), ch.key_values());
            if last.insert(key.clone(), i).is_none() {
                order.push(key);
            }
        }
        let mut delete_index: HashMap<(usize, &[String]), usize> = HashMap::new();
        for key in &order {
            let i = last[key];
            let g = *delete_index.entry((key.0, key.1)).or_insert_with(|| {
                plan.deletes.push(DeleteGroup {
                    dest: key.0,
                    key_columns: changes[i].pkey.clone(),
                    keys: Vec::new(),
                    ev_ids: Vec::new(),
                });
                plan.deletes.len() - 1
            });
            plan.deletes[g].keys.push(key.2.clone());
            plan.deletes[g].ev_ids.push(changes[i].ev_id);
        }
        let mut keep: Vec<usize> = order.iter().map(|k| last[k]).filter(|&i| changes[i].op != Op::Delete).collect();
        keep.sort_unstable();
        keep
    };
    // Consecutive events usually share table and columns: compare with the previous event's
    // group before hashing the column list.
    let mut insert_index: HashMap<(usize, Vec<&str>), usize> = HashMap::new();
    let mut prev: Option<(usize, usize)> = None; // (change index, group)
    for i in survivors {
        let ch = &changes[i];
        let g = match prev {
            Some((p, g)) if changes[p].dest == ch.dest && changes[p].same_columns(ch) => g,
            _ => {
                let cols: Vec<&str> = ch.row.iter().map(|(c, _)| c.as_ref()).collect();
                *insert_index.entry((ch.dest, cols)).or_insert_with(|| {
                    plan.inserts.push(InsertGroup { dest: ch.dest, rows: Vec::new() });
                    plan.inserts.len() - 1
                })
            }
        };
        plan.inserts[g].rows.push(i);
        prev = Some((i, g));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ch(ev_id: i64, op: Op, dest: usize, id: i64, val: &str) -> Change<'static> {
        Change {
            ev_id,
            op,
            dest,
            pkey: Rc::new(vec!["id".into()]),
            row: vec![("id".into(), Some(enc(&id.to_string()))), ("val".into(), Some(enc(val)))],
        }
    }

    /// A test value: plain text is its own encoding (the tests use no '%' or '+').
    fn enc(s: &str) -> Encoded<'static> {
        crate::decode::parse_row(crate::decode::Format::Url, Some(Box::leak(format!("v={s}").into_boxed_str())))
            .unwrap()[0]
            .1
            .unwrap()
    }

    /// The model tables hold plain decoded rows.
    type PlainRow = Vec<(String, Option<String>)>;
    type Tables = BTreeMap<usize, Vec<PlainRow>>;

    fn plain(row: &Row) -> PlainRow {
        row.iter().map(|(n, v)| (n.to_string(), v.map(|e| e.decoded().into_owned()))).collect()
    }

    fn key_of(r: &PlainRow, cols: &[String]) -> Vec<Option<String>> {
        cols.iter().map(|k| r.iter().find(|(n, _)| n == k).and_then(|(_, v)| v.clone())).collect()
    }

    fn owned(key: &[Option<Cow<str>>]) -> Vec<Option<String>> {
        key.iter().map(|v| v.as_ref().map(|c| c.to_string())).collect()
    }

    /// The original's way: for each event in order, delete the key, then insert unless D.
    fn one_by_one(mut db: Tables, changes: &[Change<'static>]) -> Tables {
        for c in changes {
            let rows = db.entry(c.dest).or_default();
            let key = owned(&c.key_values());
            rows.retain(|r| key_of(r, &c.pkey) != key);
            if c.op != Op::Delete {
                rows.push(plain(&c.row));
            }
        }
        db
    }

    fn apply_plan(mut db: Tables, changes: &[Change<'static>], p: &Plan) -> Tables {
        for d in &p.deletes {
            let rows = db.entry(d.dest).or_default();
            rows.retain(|r| !d.keys.iter().any(|key| key_of(r, &d.key_columns) == owned(key)));
        }
        for g in &p.inserts {
            for &i in &g.rows {
                assert!(changes[i].same_columns(&changes[g.rows[0]]), "one group, one column list");
                db.entry(g.dest).or_default().push(plain(&changes[i].row));
            }
        }
        db
    }

    /// Rows that were in the partitions before the batch, so deletes have something to remove.
    fn existing() -> Tables {
        let mut db = Tables::new();
        for table in [0, 1] {
            db.insert(table, (0..8).step_by(2).map(|id| plain(&ch(-1, Op::Insert, table, id, "old").row)).collect());
        }
        db
    }

    fn sorted(mut db: Tables) -> Tables {
        db.retain(|_, rows| !rows.is_empty());
        for rows in db.values_mut() {
            rows.sort();
        }
        db
    }

    #[test]
    fn keep_all_keeps_every_version_and_groups_by_column_set() {
        let mut c = vec![
            ch(1, Op::Insert, 0, 1, "x"),
            ch(2, Op::Update, 0, 1, "y"),
            ch(3, Op::Insert, 0, 1, "z"),
            ch(4, Op::Insert, 1, 2, "w"),
            ch(5, Op::Insert, 0, 3, "v"),
        ];
        c[2].row.pop();
        let p = plan(&c, Mode::KeepAll);
        assert!(p.deletes.is_empty());
        let groups: Vec<(usize, Vec<usize>)> = p.inserts.iter().map(|g| (g.dest, g.rows.clone())).collect();
        assert_eq!(groups, vec![(0, vec![0, 1, 4]), (0, vec![2]), (1, vec![3])]);
    }

    #[test]
    fn keep_latest_collapses_to_last_version() {
        let c = vec![
            ch(1, Op::Insert, 0, 1, "v1"),
            ch(2, Op::Update, 0, 1, "v2"),
            ch(3, Op::Insert, 0, 2, "w1"),
            ch(4, Op::Delete, 0, 2, "w1"),
            ch(5, Op::Update, 0, 1, "v3"),
        ];
        let p = plan(&c, Mode::KeepLatest);
        assert_eq!(p.deletes.len(), 1);
        assert_eq!(p.deletes[0].keys, vec![vec![Some("1".into())], vec![Some("2".into())]]);
        assert_eq!(p.inserts.len(), 1);
        assert_eq!(p.inserts[0].rows, vec![4]);
    }

    /// A small deterministic generator, so the test needs no extra crate and always sees the same
    /// sequences.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn keep_latest_plan_equals_one_by_one_on_random_sequences() {
        let mut rng = Lcg(42);
        for round in 0..500 {
            let n = 1 + rng.next(60) as usize;
            let mut changes = Vec::new();
            for i in 0..n {
                let op = [Op::Insert, Op::Update, Op::Delete][rng.next(3) as usize];
                let table = rng.next(2) as usize;
                let mut c = ch(i as i64, op, table, rng.next(8) as i64, &format!("r{round}e{i}"));
                match rng.next(4) {
                    0 => c.row.reverse(),   // same columns, another order: another group
                    1 => c.row[1].1 = None, // NULL value
                    2 => c.row.push(("extra".into(), Some(enc("")))),
                    _ => {}
                }
                changes.push(c);
            }
            let want = sorted(one_by_one(existing(), &changes));
            let got = sorted(apply_plan(existing(), &changes, &plan(&changes, Mode::KeepLatest)));
            assert_eq!(got, want, "round {round}: {changes:?}");
        }
    }
}
