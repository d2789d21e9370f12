//! Seeded mutation and fuzz tests of the cold start's check (`validate.rs`).
//!
//! The bases are real crash states: a ledger with a few accounts (and one intent record, so
//! that they do not depend on pids), and a forked child killed at every crash point of five
//! operations (and, for the two that create an account, the first
//! repairer killed at every step of its repair too). Each case damages a base, writes it and
//! opens it. The open must either refuse the file with a corruption error, leaving every byte
//! unchanged, or accept it with every invariant true: no lock held, every account slot holds
//! a valid name and a balance of at most 2^63-1, no name twice, BALANCE finds every account
//! the table holds with that balance, and AUDIT equals their sum and count.
//!
//! * The mutation test sets one field of one recovery structure (journal, intent record,
//!   entry, slot, header count, stripe total), or a few fields of one, or copies one slot over
//!   another, to values drawn from a mix of edge cases, plausible values (real tags, slots,
//!   stripes) and random words.
//! * The fuzz loop writes random bytes, bit flips and words anywhere in the file (header
//!   included), or cuts it short, for a bounded time.
//!
//! Both use a fixed seed by default; a failure prints the seed and the case, and
//! `LEDGER_MUTATION_SEED`, `LEDGER_MUTATION_CASE` (one case), `LEDGER_MUTATION_CASES` and
//! `LEDGER_FUZZ_SEED`, `LEDGER_FUZZ_MILLIS` replay or extend a run. The counts go to stderr
//! (`cargo test -p forkpool-ledger mutation -- --nocapture`).

use std::collections::BTreeMap;
use std::fs;
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::crash::CRASH_STATUS;
use crate::layout::{
    is_live, AllocJournal, Entry, Geometry, Header, Intent, Slot, Stripe, INTENT_BYTES, SLOT_BYTES,
    STRIPE_BYTES,
};
use crate::test_support::{acct, env_u64, open_when_free, run_in_child, scratch_dir, Rng};
use crate::validate::{Finding, Problem, Structure};
use crate::{AccountName, Health, Ledger, LedgerError, LedgerOptions, OpError, MAX_AMOUNT};

const DEFAULT_SEED: u64 = 0x15_f11e_5eed;
const DEFAULT_MUTATION_CASES: u64 = 12_000;
const DEFAULT_FUZZ_MILLIS: u64 = 2_000;

fn options() -> LedgerOptions {
    LedgerOptions {
        max_accounts: 16,
        stripes: 4,
        intent_records: 4,
        ..LedgerOptions::default()
    }
}

/// The bases' options: one intent record. An operation claims the record at `pid % records`
/// first, so with more records the crash states (and a replayed case) would depend on the
/// pids of the forked children.
fn base_options() -> LedgerOptions {
    LedgerOptions {
        intent_records: 1,
        ..options()
    }
}

// ---------------------------------------------------------------------------------------
// Bases: real crash states
// ---------------------------------------------------------------------------------------

/// A valid ledger file, perhaps left mid-operation by a killed process.
struct Base {
    what: String,
    bytes: Vec<u8>,
    geometry: Geometry,
}

type Operation = fn(&Ledger) -> bool;

fn setup(ledger: &Ledger) {
    assert_eq!(ledger.deposit(&acct("alice"), 100), Ok(100));
    assert_eq!(ledger.deposit(&acct("bob"), 50), Ok(50));
    assert_eq!(ledger.deposit(&acct("carol"), 7), Ok(7));
    assert_eq!(ledger.withdraw(&acct("carol"), 7), Ok(0));
}

/// The operations killed at every crash point, and whether they create an account.
const SCENARIOS: [(&str, Operation, bool); 5] = [
    (
        "deposit to alice",
        |l| l.deposit(&acct("alice"), 5) == Ok(105),
        false,
    ),
    (
        "deposit opening erin",
        |l| l.deposit(&acct("erin"), 9) == Ok(9),
        true,
    ),
    (
        "withdraw from bob",
        |l| l.withdraw(&acct("bob"), 20) == Ok(30),
        false,
    ),
    (
        "transfer alice to bob",
        |l| l.transfer(&acct("alice"), &acct("bob"), 30) == Ok((70, 80)),
        false,
    ),
    (
        "transfer alice to new frank",
        |l| l.transfer(&acct("alice"), &acct("frank"), 10) == Ok((90, 10)),
        true,
    ),
];

/// The repairer killed during its repair: it touches every stripe, then claims a record.
fn repair(ledger: &Ledger) -> bool {
    ledger.audit().is_ok() && ledger.withdraw(&acct("nobody"), 1) == Err(OpError::NoSuchAccount)
}

/// A base made from a fresh ledger: `setup`, then `op` killed at step `k`, then (if `j` is
/// given) the repairer killed at step `j`. Returns the base and whether the last child
/// completed (its crash point was past its end).
fn make_base(dir: &Path, key: u64, scenario: usize, k: u32, j: Option<u32>) -> (Base, bool) {
    let (name, op, _) = SCENARIOS[scenario];
    let path = dir.join(format!("base-{scenario}-{k}-{}.bin", j.unwrap_or(0)));
    let ledger = open_when_free(&path, &base_options(), &|| key).expect("create a base");
    setup(&ledger);
    let mut code = run_in_child(&ledger, k, &op);
    let mut what = format!("{name}, killed at step {k}");
    if let (CRASH_STATUS, Some(j)) = (code, j) {
        code = run_in_child(&ledger, j, &repair);
        what.push_str(&format!(", repairer killed at step {j}"));
    }
    let base = Base {
        what,
        bytes: fs::read(&path).expect("read a base"),
        geometry: *ledger.region.geometry(),
    };
    drop(ledger);
    fs::remove_file(&path).expect("remove a base file");
    (base, code != CRASH_STATUS)
}

fn bases(dir: &Path, seed: u64) -> Vec<Base> {
    let mut bases = Vec::new();
    for (scenario, &(_, _, creates)) in SCENARIOS.iter().enumerate() {
        let key = Rng::for_case(seed, scenario as u64).next_u64();
        for k in 1.. {
            let (base, completed) = make_base(dir, key, scenario, k, None);
            bases.push(base);
            if completed {
                break;
            }
            if creates {
                for j in 1.. {
                    let (base, repaired) = make_base(dir, key, scenario, k, Some(j));
                    bases.push(base);
                    if repaired {
                        break;
                    }
                }
            }
        }
    }
    bases
}

// ---------------------------------------------------------------------------------------
// The invariants of an accepted file, and what a refusal must look like
// ---------------------------------------------------------------------------------------

/// Every invariant of a ledger that a cold start accepted.
fn check_invariants(ledger: &Ledger) -> Result<(), String> {
    let geometry = *ledger.region.geometry();
    let mut accounts: BTreeMap<AccountName, u64> = BTreeMap::new();
    for i in 0..geometry.table_slots {
        let slot = ledger.region.slot(i).expect("in range");
        if !is_live(slot.tag.load(Relaxed)) {
            continue;
        }
        let words: [u64; 8] = std::array::from_fn(|w| slot.name[w].load(Relaxed));
        let name = crate::name::from_words(slot.name_len.load(Relaxed), &words)
            .ok_or(format!("slot {i} holds an invalid name"))?;
        let balance = slot.balance.load(Relaxed);
        if balance > MAX_AMOUNT {
            return Err(format!("{name} holds {balance} > 2^63-1"));
        }
        if accounts.insert(name, balance).is_some() {
            return Err(format!("{name} is held twice"));
        }
    }
    for (name, &balance) in &accounts {
        let found = ledger.balance(name);
        if found != Ok(balance) {
            return Err(format!(
                "BALANCE {name} = {found:?}, its slot holds {balance}"
            ));
        }
    }
    let audit = ledger.audit().map_err(|e| format!("AUDIT failed: {e}"))?;
    let total: u128 = accounts.values().map(|&b| u128::from(b)).sum();
    if (audit.total, audit.accounts) != (total, accounts.len() as u64) {
        return Err(format!(
            "AUDIT {audit:?}, the table holds {} accounts totalling {total}",
            accounts.len()
        ));
    }
    if !ledger.lock_holders().is_empty() || ledger.health() != Health::Healthy {
        return Err("a lock is held, or the ledger is unhealthy".into());
    }
    Ok(())
}

/// How a case ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Accepted,
    Refused,
}

/// Writes `bytes` as case `case` in `dir`, opens them, and checks the outcome; `Err`
/// describes a violation. Each case has its own file: a child forked meanwhile by another
/// test inherits the open ledger's descriptors, and would hold a reused path's guard.
fn judge(
    dir: &Path,
    case: u64,
    bytes: &[u8],
    acceptable: fn(&LedgerError) -> bool,
) -> Result<Verdict, String> {
    let path = dir.join(format!("case-{case}.bin"));
    fs::write(&path, bytes).expect("write the case");
    let verdict = match open_when_free(&path, &options(), &|| 0) {
        Ok(ledger) => check_invariants(&ledger).map(|()| Verdict::Accepted),
        Err(e) if !acceptable(&e) => Err(format!("refused for a wrong reason: {e}")),
        Err(e) if fs::read(&path).expect("read the case") != bytes => {
            Err(format!("refused ({e}) but the file was changed"))
        }
        Err(_) => Ok(Verdict::Refused),
    };
    fs::remove_file(&path).expect("remove the case");
    verdict
}

fn damaged(e: &LedgerError) -> bool {
    matches!(e, LedgerError::Damaged { .. })
}

/// Any refusal of a damaged file's contents or header; never an I/O or recovery error.
fn refused_as_bad_file(e: &LedgerError) -> bool {
    matches!(
        e,
        LedgerError::Damaged { .. }
            | LedgerError::Corrupt { .. }
            | LedgerError::BadMagic { .. }
            | LedgerError::WrongVersion { .. }
            | LedgerError::Incompatible { .. }
            | LedgerError::CapacityMismatch { .. }
            | LedgerError::Truncated { .. }
    )
}

// ---------------------------------------------------------------------------------------
// Fields and values
// ---------------------------------------------------------------------------------------

/// What a word means, which decides the values a mutation tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    State,
    SlotIndex,
    StripeIndex,
    Tag,
    Balance,
    Count,
    Owner,
    Commit,
    NameLen,
    NameWord,
    Total,
}

/// One mutable word of the file.
#[derive(Debug, Clone, Copy)]
struct Field {
    /// Which structure (for the counts).
    group: &'static str,
    /// Which instance of it (record, slot, ...), so several fields of one can be mutated.
    instance: u64,
    offset: usize,
    kind: Kind,
}

/// Every word recovery reads or recomputes, with its kind.
fn fields(geometry: &Geometry) -> Vec<Field> {
    let mut fields = Vec::new();
    let mut add = |group, instance, offset, kind| {
        fields.push(Field {
            group,
            instance,
            offset,
            kind,
        })
    };
    let journal = offset_of!(Header, journal);
    for (offset, kind) in [
        (offset_of!(AllocJournal, state), Kind::State),
        (offset_of!(AllocJournal, slot), Kind::SlotIndex),
        (offset_of!(AllocJournal, old_tag), Kind::Tag),
        (offset_of!(AllocJournal, old_count), Kind::Count),
    ] {
        add("journal", 0, journal + offset, kind);
    }
    add("header count", 0, offset_of!(Header, count), Kind::Count);
    for s in 0..u64::from(geometry.stripes) {
        let base = (geometry.off_stripes + s * STRIPE_BYTES) as usize;
        for offset in [offset_of!(Stripe, total_lo), offset_of!(Stripe, total_hi)] {
            add("stripe total", s, base + offset, Kind::Total);
        }
    }
    for r in 0..u64::from(geometry.intents) {
        let base = (geometry.off_intents + r * INTENT_BYTES) as usize;
        for (offset, kind) in [
            (offset_of!(Intent, owner), Kind::Owner),
            (offset_of!(Intent, commit), Kind::Commit),
        ] {
            add("intent record", r, base + offset, kind);
        }
        for e in 0..2u64 {
            let entry = base + offset_of!(Intent, entries) + e as usize * size_of::<Entry>();
            let instance = r * 2 + e;
            for (offset, kind) in [
                (offset_of!(Entry, state), Kind::State),
                (offset_of!(Entry, stripe), Kind::StripeIndex),
                (offset_of!(Entry, slot), Kind::SlotIndex),
                (offset_of!(Entry, before), Kind::Balance),
                (offset_of!(Entry, created), Kind::Tag),
            ] {
                add("intent entry", instance, entry + offset, kind);
            }
        }
    }
    for i in 0..geometry.table_slots {
        let base = (geometry.off_slots + i * SLOT_BYTES) as usize;
        add("slot", i, base + offset_of!(Slot, tag), Kind::Tag);
        add("slot", i, base + offset_of!(Slot, balance), Kind::Balance);
        add("slot", i, base + offset_of!(Slot, name_len), Kind::NameLen);
        for w in 0..8 {
            add(
                "slot",
                i,
                base + offset_of!(Slot, name) + 8 * w,
                Kind::NameWord,
            );
        }
    }
    fields
}

fn word(bytes: &[u8], offset: usize) -> u64 {
    u64::from_ne_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"))
}

fn set_word(bytes: &mut [u8], offset: usize, value: u64) {
    bytes[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
}

/// Edge values any word may be tried with.
const EDGES: [u64; 8] = [0, 1, 2, 3, MAX_AMOUNT, MAX_AMOUNT + 1, u64::MAX, 1 << 32];

/// A value for a field: an edge, a plausible value for its kind, or a random word.
fn value(rng: &mut Rng, field: &Field, base: &Base) -> u64 {
    let geometry = &base.geometry;
    let tags: Vec<u64> = (0..geometry.table_slots)
        .map(|i| word(&base.bytes, slot_offset(geometry, i)))
        .filter(|&t| is_live(t))
        .collect();
    match rng.below(10) {
        0..=2 => *rng.pick(&EDGES),
        3 => rng.next_u64(),
        _ => match field.kind {
            Kind::State => rng.below(3),
            Kind::SlotIndex => rng.below(geometry.table_slots + 2),
            Kind::StripeIndex => rng.below(u64::from(geometry.stripes) + 1),
            Kind::Tag => match rng.below(4) {
                0 => rng.below(2),
                1 if !tags.is_empty() => *rng.pick(&tags) ^ (1 << rng.below(64)),
                _ if !tags.is_empty() => *rng.pick(&tags),
                _ => rng.next_u64() | 2,
            },
            Kind::Balance | Kind::Total => rng.below(300),
            Kind::Count => rng.below(geometry.capacity + 3),
            Kind::Owner => (rng.below(4) << 32) | *rng.pick(&[0, 1, 1 << 22, (1 << 22) + 1]),
            Kind::Commit => rng.below(3),
            Kind::NameLen => rng.below(70),
            Kind::NameWord => {
                let slot = slot_offset(geometry, rng.below(geometry.table_slots));
                word(&base.bytes, slot + offset_of!(Slot, name))
            }
        },
    }
}

fn slot_offset(geometry: &Geometry, i: u64) -> usize {
    (geometry.off_slots + i * SLOT_BYTES) as usize
}

/// Damages `bytes` (a copy of `base`) in one of the ways the module doc lists; returns the
/// group it damaged and a description for failure messages.
fn mutate(
    rng: &mut Rng,
    base: &Base,
    fields: &[Field],
    bytes: &mut [u8],
) -> (&'static str, String) {
    let geometry = &base.geometry;
    let roll = rng.below(100);
    if roll < 8 {
        let (from, to) = (
            rng.below(geometry.table_slots),
            rng.below(geometry.table_slots),
        );
        let (a, b) = (slot_offset(geometry, from), slot_offset(geometry, to));
        bytes.copy_within(a..a + SLOT_BYTES as usize, b);
        return ("slot", format!("slot {from} copied over slot {to}"));
    }
    // A structure first (so the many slot words do not drown the few records), then one
    // of its instances, half the time one in use (an account, an active entry).
    let group = *rng.pick(&GROUPS);
    let instances: Vec<u64> = fields
        .iter()
        .filter(|f| f.group == group)
        .map(|f| f.instance)
        .collect();
    let in_use: Vec<u64> = instances
        .iter()
        .copied()
        .filter(|&i| in_use(base, group, i))
        .collect();
    let instance = if !in_use.is_empty() && rng.chance(50) {
        *rng.pick(&in_use)
    } else {
        *rng.pick(&instances)
    };
    let siblings: Vec<&Field> = fields
        .iter()
        .filter(|f| f.group == group && f.instance == instance)
        .collect();
    // Mostly one field; sometimes a few of the same structure (e.g. a whole entry).
    let count = if roll < 25 { 2 + rng.below(3) } else { 1 };
    let mut description = Vec::new();
    for _ in 0..count {
        let field = *rng.pick(&siblings);
        let new = value(rng, field, base);
        set_word(bytes, field.offset, new);
        description.push(format!(
            "{} {} {:?} at {} := {new:#x}",
            field.group, field.instance, field.kind, field.offset
        ));
    }
    (group, description.join("; "))
}

/// The structures a mutation picks from.
const GROUPS: [&str; 6] = [
    "journal",
    "header count",
    "stripe total",
    "intent record",
    "intent entry",
    "slot",
];

/// Whether instance `instance` of `group` is in use in the base: an account slot, an active
/// entry, a claimed record, an active journal.
fn in_use(base: &Base, group: &str, instance: u64) -> bool {
    let geometry = &base.geometry;
    let record = |r: u64| (geometry.off_intents + r * INTENT_BYTES) as usize;
    match group {
        "slot" => is_live(word(&base.bytes, slot_offset(geometry, instance))),
        "intent entry" => {
            let entry = record(instance / 2)
                + offset_of!(Intent, entries)
                + (instance % 2) as usize * size_of::<Entry>();
            word(&base.bytes, entry + offset_of!(Entry, state)) != 0
        }
        "intent record" => {
            word(&base.bytes, record(instance) + offset_of!(Intent, owner)) & 0xffff_ffff != 0
        }
        "journal" => {
            word(
                &base.bytes,
                offset_of!(Header, journal) + offset_of!(AllocJournal, state),
            ) != 0
        }
        _ => true,
    }
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[test]
fn every_crash_state_is_accepted_by_a_cold_start_with_its_invariants() {
    let dir = scratch_dir();
    let bases = bases(dir.path(), DEFAULT_SEED);
    assert!(bases.len() > 100, "{} bases", bases.len());
    for (case, base) in bases.iter().enumerate() {
        let verdict = judge(dir.path(), case as u64, &base.bytes, damaged);
        assert_eq!(verdict, Ok(Verdict::Accepted), "{}", base.what);
    }
}

#[test]
fn mutated_recovery_structures_are_refused_unchanged_or_accepted_consistent() {
    let seed = env_u64("LEDGER_MUTATION_SEED").unwrap_or(DEFAULT_SEED);
    let only = env_u64("LEDGER_MUTATION_CASE");
    let cases = env_u64("LEDGER_MUTATION_CASES").unwrap_or(DEFAULT_MUTATION_CASES);
    let dir = scratch_dir();
    let bases = bases(dir.path(), seed);
    let fields = fields(&bases[0].geometry);
    let mut counts: BTreeMap<(&str, Verdict), u64> = BTreeMap::new();
    let started = Instant::now();
    for case in only.map_or(0..cases, |c| c..c + 1) {
        let mut rng = Rng::for_case(seed, case);
        let base = rng.pick(&bases);
        let mut bytes = base.bytes.clone();
        let (group, description) = mutate(&mut rng, base, &fields, &mut bytes);
        match judge(dir.path(), case, &bytes, damaged) {
            Ok(verdict) => *counts.entry((group, verdict)).or_insert(0) += 1,
            Err(violation) => panic!(
                "{violation}\n  base: {}\n  mutation: {description}\n  replay: \
                 LEDGER_MUTATION_SEED={seed:#x} LEDGER_MUTATION_CASE={case}",
                base.what
            ),
        }
    }
    let (accepted, refused) = counts.iter().fold((0, 0), |(a, r), (&(_, v), &n)| match v {
        Verdict::Accepted => (a + n, r),
        Verdict::Refused => (a, r + n),
    });
    eprintln!(
        "mutation test, seed {seed:#x}: {} bases, {} cases in {:?}: {accepted} accepted \
         consistent, {refused} refused unchanged; by structure: {counts:?}",
        bases.len(),
        accepted + refused,
        started.elapsed()
    );
    if only.is_none() {
        assert!(accepted > cases / 10 && refused > cases / 10, "{counts:?}");
    }
}

#[test]
fn fuzzed_files_are_refused_unchanged_or_accepted_consistent() {
    let seed = env_u64("LEDGER_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let budget =
        Duration::from_millis(env_u64("LEDGER_FUZZ_MILLIS").unwrap_or(DEFAULT_FUZZ_MILLIS));
    let dir = scratch_dir();
    let bases = bases(dir.path(), seed);
    let started = Instant::now();
    let mut counts: BTreeMap<Verdict, u64> = BTreeMap::new();
    let mut case = 0;
    while started.elapsed() < budget {
        let mut rng = Rng::for_case(seed, case);
        let base = rng.pick(&bases);
        let mut bytes = base.bytes.clone();
        let description = fuzz(&mut rng, &mut bytes);
        match judge(dir.path(), case, &bytes, refused_as_bad_file) {
            Ok(verdict) => *counts.entry(verdict).or_insert(0) += 1,
            Err(violation) => panic!(
                "{violation}\n  base: {}\n  damage: {description}\n  replay: \
                 LEDGER_FUZZ_SEED={seed:#x}, case {case}",
                base.what
            ),
        }
        case += 1;
    }
    eprintln!("fuzz loop, seed {seed:#x}: {case} cases in {budget:?}: {counts:?}");
    assert!(case > 0);
}

/// Damages random places of the whole file: bytes, bit flips, words, or its length.
fn fuzz(rng: &mut Rng, bytes: &mut Vec<u8>) -> String {
    if rng.chance(3) {
        let len = rng.below(bytes.len() as u64 + 8192) as usize;
        bytes.resize(len, 0);
        return format!("length set to {len}");
    }
    let mut description = Vec::new();
    for _ in 0..1 + rng.below(8) {
        // Mostly the live structures; the header's first page now and then.
        let at = if rng.chance(10) {
            rng.below(256) as usize
        } else {
            rng.below(bytes.len() as u64) as usize
        };
        match rng.below(3) {
            0 => {
                bytes[at] = rng.next_u64() as u8;
                description.push(format!("byte {at}"));
            }
            1 => {
                bytes[at] ^= 1 << rng.below(8);
                description.push(format!("bit flip at {at}"));
            }
            _ => {
                let at = (at & !7).min(bytes.len() - 8);
                let new = if rng.chance(50) {
                    *rng.pick(&EDGES)
                } else {
                    rng.next_u64()
                };
                set_word(bytes, at, new);
                description.push(format!("word {at} := {new:#x}"));
            }
        }
    }
    description.join("; ")
}

/// Words to write over a file: (offset, value).
type Words = Vec<(usize, u64)>;
/// Slots to copy over others: (from, to).
type Copies = Vec<(u64, u64)>;
/// Whether a problem is the one a crafted damage must produce.
type Expected = fn(&Problem) -> bool;

/// A small valid ledger (capacity 10, alice = 100, bob = 50 and `more` accounts of 1, a fixed
/// hash key) and the places in it that the crafted cases below damage.
struct Crafted {
    dir: tempfile::TempDir,
    options: LedgerOptions,
    valid: Vec<u8>,
    geometry: Geometry,
    alice: u64,
    alice_tag: u64,
    bob_tag: u64,
    /// A free slot right after alice's probe chain, and a second one after it.
    free: u64,
    next_free: u64,
    /// The tag and home of a name not in the ledger, for an eleventh account.
    zed_tag: u64,
}

impl Crafted {
    fn new(more: &[&str]) -> Crafted {
        let dir = scratch_dir();
        let options = LedgerOptions {
            max_accounts: 10,
            ..options()
        };
        let path = dir.path().join("crafted.bin");
        let ledger = open_when_free(&path, &options, &|| 42).expect("create");
        assert_eq!(ledger.deposit(&acct("alice"), 100), Ok(100));
        assert_eq!(ledger.deposit(&acct("bob"), 50), Ok(50));
        for name in more {
            assert_eq!(ledger.deposit(&acct(name), 1), Ok(1));
        }
        let geometry = *ledger.region.geometry();
        let tag_at = |i: u64| ledger.region.slot(i).expect("in range").tag.load(Relaxed);
        let find = |name: &str| {
            let tag = ledger.tag_of(&acct(name));
            let slot = (0..geometry.table_slots)
                .find(|&i| tag_at(i) == tag)
                .expect("the account exists");
            (slot, tag)
        };
        let ((alice, alice_tag), (_, bob_tag)) = (find("alice"), find("bob"));
        let free_after = |i: u64| {
            (1..geometry.table_slots)
                .map(|k| (i + k) % geometry.table_slots)
                .find(|&j| tag_at(j) == 0)
                .expect("a free slot")
        };
        let free = free_after(alice);
        let next_free = free_after(free);
        let zed_tag = ledger.tag_of(&acct("zed"));
        drop(ledger);
        Crafted {
            valid: fs::read(&path).expect("read"),
            dir,
            options,
            geometry,
            alice,
            alice_tag,
            bob_tag,
            free,
            next_free,
            zed_tag,
        }
    }

    fn entry(&self, record: u64, entry: usize, field: usize) -> usize {
        (self.geometry.off_intents + record * INTENT_BYTES) as usize
            + offset_of!(Intent, entries)
            + entry * size_of::<Entry>()
            + field
    }

    fn record(&self, record: u64, field: usize) -> usize {
        (self.geometry.off_intents + record * INTENT_BYTES) as usize + field
    }

    fn journal(&self, field: usize) -> usize {
        offset_of!(Header, journal) + field
    }

    fn slot(&self, i: u64, field: usize) -> usize {
        slot_offset(&self.geometry, i) + field
    }

    /// The stripe of a tag, and another one.
    fn stripes_of(&self, tag: u64) -> (u64, u64) {
        let stripe = u64::from(self.geometry.stripe_of(tag));
        (stripe, (stripe + 1) % u64::from(self.geometry.stripes))
    }

    /// An active entry (record 0, entry 0) undoing a balance change of slot `slot`.
    fn undo(&self, stripe: u64, slot: u64, before: u64, created: u64) -> Vec<(usize, u64)> {
        vec![
            (self.entry(0, 0, offset_of!(Entry, stripe)), stripe),
            (self.entry(0, 0, offset_of!(Entry, slot)), slot),
            (self.entry(0, 0, offset_of!(Entry, before)), before),
            (self.entry(0, 0, offset_of!(Entry, created)), created),
            (self.entry(0, 0, offset_of!(Entry, state)), 1),
        ]
    }

    /// An active journal.
    fn rollback(&self, slot: u64, old_tag: u64, old_count: u64) -> Vec<(usize, u64)> {
        vec![
            (self.journal(offset_of!(AllocJournal, slot)), slot),
            (self.journal(offset_of!(AllocJournal, old_tag)), old_tag),
            (self.journal(offset_of!(AllocJournal, old_count)), old_count),
            (self.journal(offset_of!(AllocJournal, state)), 1),
        ]
    }

    /// Opens the valid file with `words` written over it; returns the finding, checking
    /// that the refused file is unchanged.
    fn finding(&self, words: &[(usize, u64)], copies: &[(u64, u64)]) -> Finding {
        let mut bytes = self.valid.clone();
        for &(from, to) in copies {
            let (a, b) = (
                slot_offset(&self.geometry, from),
                slot_offset(&self.geometry, to),
            );
            bytes.copy_within(a..a + SLOT_BYTES as usize, b);
        }
        for &(offset, value) in words {
            set_word(&mut bytes, offset, value);
        }
        let path = self.dir.path().join("case.bin");
        fs::write(&path, &bytes).expect("write");
        let finding = match open_when_free(&path, &self.options, &|| 42) {
            Err(LedgerError::Damaged { finding, .. }) => finding,
            other => panic!("expected a finding, got {other:?} for {words:?} {copies:?}"),
        };
        assert!(fs::read(&path).expect("read") == bytes, "unchanged");
        finding
    }
}

/// The issue's three crafted files (10 accounts, alice = 100, bob = 50), each refused with a
/// finding that names the structure.
#[test]
fn the_three_crafted_cases_of_the_issue_are_refused_naming_the_structure() {
    let c = Crafted::new(&[]);
    let (alice_stripe, _) = c.stripes_of(c.alice_tag);
    let before_too_large = c.undo(alice_stripe, c.alice, u64::MAX, 0);
    assert_eq!(
        c.finding(&before_too_large, &[]),
        Finding {
            structure: Structure::Entry {
                record: 0,
                entry: 0
            },
            problem: Problem::BeforeTooLarge(u64::MAX),
        }
    );
    let mut resurrection = c.rollback(c.free, c.bob_tag, 2);
    resurrection.push((c.slot(c.free, offset_of!(Slot, balance)), 10u64.pow(18)));
    assert_eq!(
        c.finding(&resurrection, &[]),
        Finding {
            structure: Structure::Journal,
            problem: Problem::JournalDisagrees {
                current: 0,
                old: c.bob_tag
            },
        }
    );
    // Reported at the later of the two slots.
    assert_eq!(
        c.finding(&[], &[(c.alice, c.free)]),
        Finding {
            structure: Structure::Slot(c.free.max(c.alice)),
            problem: Problem::Duplicate {
                name: acct("alice"),
                first: c.free.min(c.alice),
            },
        }
    );
}

/// Every problem the check knows, each from one crafted damage: the check is a list of
/// rules, and each rule refuses what it exists for.
#[test]
fn each_finding_is_reported_for_the_damage_it_describes() {
    let c = Crafted::new(&[]);
    let slots = c.geometry.table_slots;
    let (alice_stripe, other_stripe) = c.stripes_of(c.alice_tag);
    let state = c.journal(offset_of!(AllocJournal, state));
    let tombstone_with_a_bad_name = vec![
        (c.slot(c.free, offset_of!(Slot, tag)), 1),
        (c.slot(c.free, offset_of!(Slot, name_len)), 99),
    ];
    let mut shared = c.undo(alice_stripe, c.alice, 1, 0);
    shared.extend(
        [
            (offset_of!(Entry, stripe), alice_stripe),
            (offset_of!(Entry, slot), c.alice),
            (offset_of!(Entry, before), 2),
            (offset_of!(Entry, created), 0),
            (offset_of!(Entry, state), 1),
        ]
        .map(|(field, value)| (c.entry(1, 1, field), value)),
    );
    // An eleventh account, valid and reachable, in a full ledger of capacity 10.
    let full = Crafted::new(&["c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"]);
    let zed = {
        let c = &full;
        let home = c.geometry.home_of(c.zed_tag);
        let slot = (0..slots)
            .map(|k| (home + k) % slots)
            .find(|&i| {
                let tag = word(&c.valid, c.slot(i, offset_of!(Slot, tag)));
                tag == 0 || tag == 1
            })
            .expect("a free slot");
        let words = crate::name::words(&acct("zed"));
        let mut eleventh = vec![
            (c.slot(slot, offset_of!(Slot, tag)), c.zed_tag),
            (c.slot(slot, offset_of!(Slot, name_len)), 3),
        ];
        eleventh.extend((0..8).map(|w| (c.slot(slot, offset_of!(Slot, name) + 8 * w), words[w])));
        eleventh
    };
    let cases: Vec<(Words, Copies, Expected)> = vec![
        (vec![(state, 2)], vec![], |p| {
            matches!(p, Problem::BadState(2))
        }),
        (c.rollback(slots, 0, 1), vec![], |p| {
            matches!(p, Problem::SlotOutOfRange(_))
        }),
        (c.rollback(c.free, 4, 1), vec![], |p| {
            matches!(p, Problem::InvalidTag(4))
        }),
        (c.rollback(c.alice, c.alice_tag, 11), vec![], |p| {
            matches!(p, Problem::CountAboveCapacity(11))
        }),
        (c.rollback(c.free, c.bob_tag, 2), vec![], |p| {
            matches!(p, Problem::JournalDisagrees { .. })
        }),
        (
            vec![(c.record(1, offset_of!(Intent, commit)), 2)],
            vec![],
            |p| matches!(p, Problem::BadCommit(2)),
        ),
        (
            vec![(c.record(1, offset_of!(Intent, owner)), (1 << 22) + 1)],
            vec![],
            |p| matches!(p, Problem::BadOwner(_)),
        ),
        (c.undo(4, c.alice, 1, 0), vec![], |p| {
            matches!(p, Problem::StripeOutOfRange(4))
        }),
        (c.undo(alice_stripe, slots, 1, 0), vec![], |p| {
            matches!(p, Problem::SlotOutOfRange(_))
        }),
        (c.undo(alice_stripe, c.alice, 0, 4), vec![], |p| {
            matches!(p, Problem::InvalidTag(4))
        }),
        (c.undo(other_stripe, c.alice, 0, c.alice_tag), vec![], |p| {
            matches!(p, Problem::CreatedInOtherStripe { .. })
        }),
        (
            c.undo(alice_stripe, c.alice, MAX_AMOUNT + 1, 0),
            vec![],
            |p| matches!(p, Problem::BeforeTooLarge(_)),
        ),
        (shared, vec![], |p| matches!(p, Problem::SlotShared { .. })),
        (c.undo(alice_stripe, c.free, 1, 0), vec![], |p| {
            matches!(p, Problem::NoAccount(_))
        }),
        (c.undo(other_stripe, c.alice, 1, 0), vec![], |p| {
            matches!(p, Problem::OtherStripe { .. })
        }),
        (
            vec![(c.slot(c.alice, offset_of!(Slot, name)), 0x21)],
            vec![],
            |p| matches!(p, Problem::InvalidName),
        ),
        (
            vec![(c.slot(c.alice, offset_of!(Slot, tag)), c.bob_tag)],
            vec![],
            |p| matches!(p, Problem::TagNotHash(_)),
        ),
        (
            vec![(c.slot(c.alice, offset_of!(Slot, balance)), MAX_AMOUNT + 1)],
            vec![],
            |p| matches!(p, Problem::BalanceTooLarge(_)),
        ),
        (
            vec![(c.slot(c.free, offset_of!(Slot, tag)), 4)],
            vec![],
            |p| matches!(p, Problem::InvalidTag(4)),
        ),
        (vec![], vec![(c.alice, c.free)], |p| {
            matches!(p, Problem::Duplicate { .. })
        }),
        // Alice moved past a free slot: her lookup stops there.
        (
            vec![(c.slot(c.alice, offset_of!(Slot, tag)), 0)],
            vec![(c.alice, c.next_free)],
            |p| matches!(p, Problem::Unreachable { .. }),
        ),
        (
            [tombstone_with_a_bad_name, c.rollback(c.free, c.bob_tag, 2)].concat(),
            vec![],
            |p| matches!(p, Problem::InvalidName),
        ),
    ];
    for (words, copies, expected) in cases {
        let finding = c.finding(&words, &copies);
        assert!(
            expected(&finding.problem),
            "{finding} for {words:?} {copies:?}"
        );
    }
    let finding = full.finding(&zed, &[]);
    assert!(
        matches!(
            finding.problem,
            Problem::TooManyAccounts { accounts: 11, .. }
        ),
        "{finding}"
    );
}
