//! The read-only check a cold start runs before it changes anything: does every structure that
//! recovery reads make sense, and would the state recovery leaves be a ledger?
//!
//! Recovery trusts the undo (intent) records and the allocation journal: it writes their
//! before-images into the table. A damaged or crafted record must therefore be refused, not
//! applied (a before-balance of 2^64-1, a journal that resurrects an account no lookup can
//! reach, an entry that rewrites another stripe's account). The check has two parts:
//!
//! 1. **The structures**, each on its own: state words are idle or active; stripe and slot
//!    numbers are in range; tags are free, tombstone or an account's; before-balances and the
//!    journal's count are in range; commit words are 0 or 1; owner words hold a possible pid;
//!    no two active entries name one slot; the journal can only have changed its slot's tag
//!    from its old tag to an account's (a creation) or from an account's to a tombstone (an
//!    un-creation); an entry that restores a balance names an account of its own stripe.
//! 2. **The outcome**: recovery is simulated on an overlay of the slots it would change (the
//!    file is not written), in the order the cold start applies it (journal, then entries),
//!    and the resulting table must be a ledger: every account slot holds a valid name whose
//!    hash is its tag and a balance of at most 2^63-1, there are at most `capacity` accounts,
//!    no name is held twice, and every account is reachable by a lookup (no free slot between
//!    its home slot and it). Stripe totals and the account count are recomputed by recovery
//!    from the table, so they are not checked.
//!
//! The first problem found is returned as a [`Finding`] naming the structure. Adding a
//! structure (e.g. a log to replay) means adding its checks to part 1 and its effect to the
//! overlay in part 2.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;

use crate::layout::{is_live, live_tag, Entry, Geometry, ACTIVE, FREE, IDLE, TOMB};
use crate::region::Region;
use crate::{AccountName, MAX_AMOUNT};

/// Largest pid Linux can hand out (`PID_MAX_LIMIT`, 2^22).
const PID_MAX_LIMIT: u64 = 1 << 22;

/// The structure a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Structure {
    /// The allocation lock's undo journal.
    Journal,
    /// An intent record's own words (owner, commit).
    Record(u32),
    /// One entry (undo image) of an intent record.
    Entry { record: u32, entry: usize },
    /// An account slot as the file holds it.
    Slot(u64),
    /// An account slot as recovery would leave it (it changes the slot).
    RecoveredSlot(u64),
    /// The account table as a whole.
    Table,
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Structure::Journal => f.write_str("the allocation journal"),
            Structure::Record(r) => write!(f, "intent record {r}"),
            Structure::Entry { record, entry } => write!(f, "intent record {record} entry {entry}"),
            Structure::Slot(i) => write!(f, "account slot {i}"),
            Structure::RecoveredSlot(i) => write!(f, "account slot {i} as recovery would leave it"),
            Structure::Table => f.write_str("the account table"),
        }
    }
}

/// What is wrong with a structure.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// A state word that is neither idle (0) nor active (1).
    BadState(u64),
    /// A slot number beyond the table.
    SlotOutOfRange(u64),
    /// A stripe number beyond the stripes.
    StripeOutOfRange(u64),
    /// A tag that is neither free, tombstone nor an account's.
    InvalidTag(u64),
    /// A journaled account count above the capacity.
    CountAboveCapacity(u64),
    /// The slot's tag is not one the journaled change can have left.
    JournalDisagrees { current: u64, old: u64 },
    /// A commit word that is neither 0 nor 1.
    BadCommit(u64),
    /// An owner word whose pid cannot exist.
    BadOwner(u64),
    /// A created account's tag that belongs to another stripe than the entry's.
    CreatedInOtherStripe { tag: u64, stripe: u32 },
    /// A before-image above 2^63-1.
    BeforeTooLarge(u64),
    /// Two active entries name one slot.
    SlotShared { record: u32, entry: usize },
    /// An entry restores the balance of a slot that holds no account.
    NoAccount(u64),
    /// An entry restores the balance of an account of another stripe.
    OtherStripe { slot: u64, stripe: u32 },
    /// An account slot whose name is not a valid account name.
    InvalidName,
    /// An account slot whose tag is not its name's hash.
    TagNotHash(AccountName),
    /// A balance above 2^63-1.
    BalanceTooLarge(u64),
    /// More accounts than the capacity.
    TooManyAccounts { accounts: u64, capacity: u64 },
    /// The same name in two slots.
    Duplicate { name: AccountName, first: u64 },
    /// An account a lookup cannot reach: a free slot lies between its home slot and it.
    Unreachable { name: AccountName, home: u64 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::BadState(v) => write!(f, "state {v} is neither idle (0) nor active (1)"),
            Problem::SlotOutOfRange(i) => write!(f, "names slot {i}, beyond the table"),
            Problem::StripeOutOfRange(s) => write!(f, "names stripe {s}, beyond the stripes"),
            Problem::InvalidTag(t) => {
                write!(
                    f,
                    "tag {t:#x} is neither free, a tombstone nor an account's"
                )
            }
            Problem::CountAboveCapacity(n) => {
                write!(f, "its account count {n} is above the capacity")
            }
            Problem::JournalDisagrees { current, old } => write!(
                f,
                "its slot holds tag {current:#x}, which the journaled change from tag {old:#x} \
                 cannot have left"
            ),
            Problem::BadCommit(v) => write!(f, "commit word {v} is neither 0 nor 1"),
            Problem::BadOwner(word) => write!(
                f,
                "owner word {word:#x} holds pid {}, which cannot exist",
                word & 0xffff_ffff
            ),
            Problem::CreatedInOtherStripe { tag, stripe } => write!(
                f,
                "the account it created (tag {tag:#x}) belongs to stripe {stripe}, not the \
                 entry's"
            ),
            Problem::BeforeTooLarge(b) => write!(f, "before-balance {b} is above 2^63-1"),
            Problem::SlotShared { record, entry } => write!(
                f,
                "names the same slot as intent record {record} entry {entry}"
            ),
            Problem::NoAccount(i) => write!(
                f,
                "restores the balance of slot {i}, which holds no account"
            ),
            Problem::OtherStripe { slot, stripe } => write!(
                f,
                "restores the balance of slot {slot}, an account of stripe {stripe}, not the \
                 entry's"
            ),
            Problem::InvalidName => f.write_str("holds an invalid account name"),
            Problem::TagNotHash(name) => {
                write!(f, "holds account {name} under a tag that is not its hash")
            }
            Problem::BalanceTooLarge(b) => write!(f, "balance {b} is above 2^63-1"),
            Problem::TooManyAccounts { accounts, capacity } => {
                write!(f, "{accounts} accounts, above the capacity {capacity}")
            }
            Problem::Duplicate { name, first } => {
                write!(f, "holds account {name}, which slot {first} holds too")
            }
            Problem::Unreachable { name, home } => write!(
                f,
                "holds account {name}, which a lookup from its home slot {home} cannot reach"
            ),
        }
    }
}

/// One problem in one structure: why a file is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{structure}: {problem}")]
pub struct Finding {
    pub structure: Structure,
    pub problem: Problem,
}

fn finding<T>(structure: Structure, problem: Problem) -> Result<T, Finding> {
    Err(Finding { structure, problem })
}

/// Checks the structures recovery reads and the state it would leave (see the module doc).
/// Reads the mapping only.
pub(crate) fn check(region: &Region) -> Result<(), Finding> {
    let mut outcome = Outcome::new(region);
    check_journal(&mut outcome)?;
    check_records(&mut outcome)?;
    outcome.check_table()
}

fn valid_tag(tag: u64) -> bool {
    tag == FREE || tag == TOMB || is_live(tag)
}

fn check_state(structure: Structure, state: u64) -> Result<bool, Finding> {
    match state {
        IDLE => Ok(false),
        ACTIVE => Ok(true),
        other => finding(structure, Problem::BadState(other)),
    }
}

/// The journal: its fields, that its slot's tag is one its change can have left, and its
/// rollback (the first thing recovery applies).
fn check_journal(outcome: &mut Outcome<'_>) -> Result<(), Finding> {
    let geometry = *outcome.region.geometry();
    let journal = &outcome.region.header().journal;
    let structure = Structure::Journal;
    if !check_state(structure, journal.state.load(Relaxed))? {
        return Ok(());
    }
    let slot = journal.slot.load(Relaxed);
    let old = journal.old_tag.load(Relaxed);
    let count = journal.old_count.load(Relaxed);
    if slot >= geometry.table_slots {
        return finding(structure, Problem::SlotOutOfRange(slot));
    }
    if !valid_tag(old) {
        return finding(structure, Problem::InvalidTag(old));
    }
    if count > geometry.capacity {
        return finding(structure, Problem::CountAboveCapacity(count));
    }
    let current = outcome.tag(slot);
    // A creation turns a free or tombstone slot into an account; an un-creation turns an
    // account into a tombstone. Either may have been cut before it changed the tag.
    let possible = current == old
        || if is_live(old) {
            current == TOMB
        } else {
            is_live(current)
        };
    if !possible {
        return finding(structure, Problem::JournalDisagrees { current, old });
    }
    outcome.set_tag(slot, old);
    Ok(())
}

/// Every intent record: its words, its active entries' fields and cross-references, and the
/// undo of the uncommitted ones. Active entries name distinct slots (checked), so the order
/// in which they are undone does not change the outcome.
fn check_records(outcome: &mut Outcome<'_>) -> Result<(), Finding> {
    let geometry = *outcome.region.geometry();
    let mut claimed: BTreeMap<u64, (u32, usize)> = BTreeMap::new();
    for record in 0..geometry.intents {
        let intent = outcome.region.intent(record);
        let owner = intent.owner.load(Relaxed);
        if owner & 0xffff_ffff > PID_MAX_LIMIT {
            return finding(Structure::Record(record), Problem::BadOwner(owner));
        }
        let committed = match intent.commit.load(Relaxed) {
            0 => false,
            1 => true,
            other => return finding(Structure::Record(record), Problem::BadCommit(other)),
        };
        for (index, entry) in intent.entries.iter().enumerate() {
            let structure = Structure::Entry {
                record,
                entry: index,
            };
            let Some(undo) = Undo::read(entry, &geometry, structure)? else {
                continue;
            };
            if let Some(&(record, entry)) = claimed.get(&undo.slot) {
                return finding(structure, Problem::SlotShared { record, entry });
            }
            claimed.insert(undo.slot, (record, index));
            if !committed {
                undo.apply(outcome, structure)?;
            }
        }
    }
    Ok(())
}

/// An active entry, its fields checked.
struct Undo {
    stripe: u32,
    slot: u64,
    before: u64,
    /// The tag of the account the operation created, or 0.
    created: u64,
}

impl Undo {
    fn read(
        entry: &Entry,
        geometry: &Geometry,
        structure: Structure,
    ) -> Result<Option<Undo>, Finding> {
        if !check_state(structure, entry.state.load(Relaxed))? {
            return Ok(None);
        }
        let stripe = entry.stripe.load(Relaxed);
        let slot = entry.slot.load(Relaxed);
        let before = entry.before.load(Relaxed);
        let created = entry.created.load(Relaxed);
        let Some(stripe) = u32::try_from(stripe).ok().filter(|&s| s < geometry.stripes) else {
            return finding(structure, Problem::StripeOutOfRange(stripe));
        };
        if slot >= geometry.table_slots {
            return finding(structure, Problem::SlotOutOfRange(slot));
        }
        if created != 0 {
            if !is_live(created) {
                return finding(structure, Problem::InvalidTag(created));
            }
            if geometry.stripe_of(created) != stripe {
                return finding(
                    structure,
                    Problem::CreatedInOtherStripe {
                        tag: created,
                        stripe: geometry.stripe_of(created),
                    },
                );
            }
        } else if before > MAX_AMOUNT {
            return finding(structure, Problem::BeforeTooLarge(before));
        }
        Ok(Some(Undo {
            stripe,
            slot,
            before,
            created,
        }))
    }

    /// What recovery does with an uncommitted entry: un-create the account it created (if
    /// the slot still holds it), or restore the before-image of an account of its stripe.
    fn apply(&self, outcome: &mut Outcome<'_>, structure: Structure) -> Result<(), Finding> {
        let tag = outcome.tag(self.slot);
        if self.created != 0 {
            if tag == self.created {
                outcome.set_tag(self.slot, TOMB);
            }
            return Ok(());
        }
        if !is_live(tag) {
            return finding(structure, Problem::NoAccount(self.slot));
        }
        let stripe = outcome.region.geometry().stripe_of(tag);
        if stripe != self.stripe {
            return finding(
                structure,
                Problem::OtherStripe {
                    slot: self.slot,
                    stripe,
                },
            );
        }
        outcome.set_balance(self.slot, self.before);
        Ok(())
    }
}

/// A slot's tag and balance as recovery would leave them.
#[derive(Debug, Clone, Copy)]
struct SlotImage {
    tag: u64,
    balance: u64,
}

/// The table as recovery would leave it: the file's slots, with the few that recovery
/// changes overlaid.
struct Outcome<'a> {
    region: &'a Region,
    changed: BTreeMap<u64, SlotImage>,
}

impl<'a> Outcome<'a> {
    fn new(region: &'a Region) -> Outcome<'a> {
        Outcome {
            region,
            changed: BTreeMap::new(),
        }
    }

    fn file_slot(&self, i: u64) -> SlotImage {
        let slot = self
            .region
            .slot(i)
            .expect("the validator only asks for slots below table_slots");
        SlotImage {
            tag: slot.tag.load(Relaxed),
            balance: slot.balance.load(Relaxed),
        }
    }

    fn image(&self, i: u64) -> SlotImage {
        self.changed
            .get(&i)
            .copied()
            .unwrap_or_else(|| self.file_slot(i))
    }

    fn tag(&self, i: u64) -> u64 {
        self.image(i).tag
    }

    fn set_tag(&mut self, i: u64, tag: u64) {
        let image = self.image(i);
        self.changed.insert(i, SlotImage { tag, ..image });
    }

    fn set_balance(&mut self, i: u64, balance: u64) {
        let image = self.image(i);
        self.changed.insert(i, SlotImage { balance, ..image });
    }

    fn structure(&self, i: u64) -> Structure {
        if self.changed.contains_key(&i) {
            Structure::RecoveredSlot(i)
        } else {
            Structure::Slot(i)
        }
    }

    /// The name an account slot holds, checked against its tag.
    fn name(&self, i: u64, tag: u64) -> Result<AccountName, Finding> {
        let slot = self
            .region
            .slot(i)
            .expect("the validator only asks for slots below table_slots");
        let words: [u64; 8] = std::array::from_fn(|w| slot.name[w].load(Relaxed));
        let Some(name) = crate::name::from_words(slot.name_len.load(Relaxed), &words) else {
            return finding(self.structure(i), Problem::InvalidName);
        };
        let key = self.region.geometry().hash_key;
        if live_tag(crate::name::hash(key, &name)) != tag {
            return finding(self.structure(i), Problem::TagNotHash(name));
        }
        Ok(name)
    }

    /// Every slot of the outcome is valid, and the accounts form a ledger.
    fn check_table(&self) -> Result<(), Finding> {
        let geometry = *self.region.geometry();
        let mut accounts = 0u64;
        for i in 0..geometry.table_slots {
            let SlotImage { tag, balance } = self.image(i);
            if !valid_tag(tag) {
                return finding(self.structure(i), Problem::InvalidTag(tag));
            }
            if is_live(tag) {
                self.name(i, tag)?;
                if balance > MAX_AMOUNT {
                    return finding(self.structure(i), Problem::BalanceTooLarge(balance));
                }
                accounts += 1;
            }
        }
        if accounts > geometry.capacity {
            return finding(
                Structure::Table,
                Problem::TooManyAccounts {
                    accounts,
                    capacity: geometry.capacity,
                },
            );
        }
        self.check_probe_chains()
    }

    /// Every account is reachable from its home slot, and no name is held twice. One pass
    /// around the table from just after a free slot; each run of non-free slots between two
    /// free ones is checked for duplicates (two slots with one name share a home, so, both
    /// being reachable, they lie in one run). Time O(slots), memory O(longest run).
    fn check_probe_chains(&self) -> Result<(), Finding> {
        let geometry = *self.region.geometry();
        let slots = geometry.table_slots;
        let first_free = (0..slots).find(|&i| self.tag(i) == FREE);
        let start = first_free.map_or(0, |free| free + 1);
        let mut last_free = first_free;
        let mut run: Vec<(u64, u64)> = Vec::new();
        for k in 0..slots {
            let i = (start + k) % slots;
            let tag = self.tag(i);
            if tag == FREE {
                self.check_duplicates(&mut run)?;
                last_free = Some(i);
                continue;
            }
            if !is_live(tag) {
                continue;
            }
            let home = geometry.home_of(tag);
            if let Some(free) = last_free {
                // Reachable iff the home lies after the last free slot, up to this one.
                if (i + slots - home) % slots >= (i + slots - free) % slots {
                    let name = self.name(i, tag)?;
                    return finding(self.structure(i), Problem::Unreachable { name, home });
                }
            }
            run.push((tag, i));
        }
        self.check_duplicates(&mut run)
    }

    /// Looks for one name twice among the (tag, slot) pairs of a run; empties the run. Only
    /// slots with equal tags can hold equal names (the tag is the name's hash, checked).
    fn check_duplicates(&self, run: &mut Vec<(u64, u64)>) -> Result<(), Finding> {
        run.sort_unstable();
        for same_tag in run.chunk_by(|a, b| a.0 == b.0).filter(|g| g.len() > 1) {
            for (k, &(tag, i)) in same_tag.iter().enumerate().skip(1) {
                let name = self.name(i, tag)?;
                for &(_, first) in &same_tag[..k] {
                    if self.name(first, tag)? == name {
                        return finding(self.structure(i), Problem::Duplicate { name, first });
                    }
                }
            }
        }
        run.clear();
        Ok(())
    }
}
