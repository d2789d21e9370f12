//! The operations and the machinery they share: lock guards (which trigger repair on
//! `EOWNERDEAD`), claiming an intent record, finding and creating accounts.
//!
//! Every mutating operation follows one pattern: claim a record, lock the stripe(s) in
//! ascending order, check everything that can fail, write the before-images into the record
//! (state word last, release), modify, commit (clear the entries, or set `commit` first when
//! two entries must agree), unlock, free the record. Nothing can fail once an entry is set.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use crate::crash_point;
use crate::health::Access;
use crate::layout::{live_tag, Entry, Intent, Slot, ACTIVE, FREE, IDLE, TOMB};
use crate::{AccountName, Audit, Ledger, LockId, OpError, MAX_AMOUNT};
use forkpool_shm::{my_pid, pid_alive, run_wait_hook, Acquired};

/// Back-off while every intent record is in use by live processes.
const RECORD_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// A held stripe lock; unlocks on drop.
pub(crate) struct StripeGuard<'a> {
    ledger: &'a Ledger,
    stripe: u32,
}

impl Drop for StripeGuard<'_> {
    fn drop(&mut self) {
        self.ledger.region.stripe(self.stripe).lock.unlock();
    }
}

/// The held allocation lock; unlocks on drop.
pub(crate) struct AllocGuard<'a> {
    ledger: &'a Ledger,
}

impl Drop for AllocGuard<'_> {
    fn drop(&mut self) {
        self.ledger.region.header().alloc.unlock();
    }
}

/// A claimed intent record; freed on drop (its entries are clear by then).
pub(crate) struct Claim<'a> {
    ledger: &'a Ledger,
    index: u32,
    word: u64,
}

impl Claim<'_> {
    fn record(&self) -> &Intent {
        self.ledger.region.intent(self.index)
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        crash_point();
        self.record().owner.store(self.word & !0xffff_ffff, Release);
    }
}

fn check_amount(amount: u64) -> Result<(), OpError> {
    if amount == 0 || amount > MAX_AMOUNT {
        Err(OpError::BadAmount)
    } else {
        Ok(())
    }
}

impl Entry {
    /// Records a before-image; the state word goes last so a repairer that sees ACTIVE sees
    /// the rest.
    pub(crate) fn set(&self, stripe: u32, slot: u64, before: u64, created: u64) {
        self.stripe.store(u64::from(stripe), Relaxed);
        self.slot.store(slot, Relaxed);
        self.before.store(before, Relaxed);
        self.created.store(created, Relaxed);
        self.state.store(ACTIVE, Release);
    }

    pub(crate) fn clear(&self) {
        self.state.store(IDLE, Release);
    }
}

impl Slot {
    pub(crate) fn holds(&self, tag: u64, name: &AccountName, words: &[u64; 8]) -> bool {
        self.tag.load(Acquire) == tag
            && self.name_len.load(Relaxed) == crate::name::stored_len(name)
            && self
                .name
                .iter()
                .zip(words)
                .all(|(w, n)| w.load(Relaxed) == *n)
    }
}

impl Ledger {
    pub(crate) fn tag_of(&self, name: &AccountName) -> u64 {
        live_tag(crate::name::hash(self.region.geometry().hash_key, name))
    }

    fn stripe_of(&self, tag: u64) -> u32 {
        self.region.geometry().stripe_of(tag)
    }

    fn slot(&self, i: u64) -> &Slot {
        self.region
            .slot(i)
            .expect("slot indexes computed by the ledger are masked to the table size")
    }

    /// Locks stripe `s`, repairing it first if its previous holder died.
    pub(crate) fn lock_stripe(&self, s: u32) -> Result<StripeGuard<'_>, OpError> {
        let lock = &self.region.stripe(s).lock;
        match lock.lock() {
            Ok(Acquired::Clean) => Ok(StripeGuard {
                ledger: self,
                stripe: s,
            }),
            Ok(Acquired::OwnerDied) => match self.repair_stripe(s) {
                Ok(()) => {
                    lock.consistent();
                    Ok(StripeGuard {
                        ledger: self,
                        stripe: s,
                    })
                }
                Err(e) => {
                    // Unlocking without `consistent` marks the stripe unrecoverable: every
                    // later user gets the error instead of an unrepaired state.
                    log::error!(
                        "ledger {}: repair of stripe {s} failed: {e}",
                        self.path.display()
                    );
                    lock.unlock();
                    Err(e)
                }
            },
            Err(_) => Err(OpError::Unrecoverable(LockId::Stripe(s))),
        }
    }

    /// Locks the allocation lock (always after any stripe lock), rolling back the journal of
    /// a holder that died.
    pub(crate) fn lock_alloc(&self) -> Result<AllocGuard<'_>, OpError> {
        let lock = &self.region.header().alloc;
        match lock.lock() {
            Ok(Acquired::Clean) => Ok(AllocGuard { ledger: self }),
            Ok(Acquired::OwnerDied) => {
                self.repair_alloc();
                lock.consistent();
                Ok(AllocGuard { ledger: self })
            }
            Err(_) => Err(OpError::Unrecoverable(LockId::Alloc)),
        }
    }

    /// Claims a free intent record (CAS of the owner word from pid 0 to ours), reclaiming
    /// records of dead processes once they are repaired; waits while all are in live use.
    pub(crate) fn claim(&self) -> Result<Claim<'_>, OpError> {
        let pid = my_pid() as u32;
        let n = self.region.geometry().intents;
        let start = pid % n;
        loop {
            for k in 0..n {
                let index = (start + k) % n;
                let record = self.region.intent(index);
                let word = record.owner.load(Relaxed);
                if word as u32 != 0 {
                    continue;
                }
                let mine = (word & !0xffff_ffff).wrapping_add(1 << 32) | u64::from(pid);
                if record
                    .owner
                    .compare_exchange(word, mine, AcqRel, Relaxed)
                    .is_ok()
                {
                    record.commit.store(0, Release);
                    return Ok(Claim {
                        ledger: self,
                        index,
                        word: mine,
                    });
                }
            }
            if !self.reclaim_dead_records()? {
                run_wait_hook();
                std::thread::sleep(RECORD_WAIT);
            }
        }
    }

    /// Frees records whose owner died. One with pending entries is repaired first by taking
    /// the stripes it names (in ascending order; the repair frees it). Returns whether any
    /// record was freed or repaired.
    fn reclaim_dead_records(&self) -> Result<bool, OpError> {
        let mut progress = false;
        for index in 0..self.region.geometry().intents {
            let record = self.region.intent(index);
            let word = record.owner.load(Acquire);
            let pid = word as u32 as i32;
            if pid == 0 || pid_alive(pid) {
                continue;
            }
            let mut stripes = [None, None];
            for (e, out) in record.entries.iter().zip(stripes.iter_mut()) {
                if e.state.load(Acquire) == ACTIVE {
                    *out = u32::try_from(e.stripe.load(Relaxed))
                        .ok()
                        .filter(|&s| s < self.region.geometry().stripes);
                }
            }
            if stripes == [None, None] {
                progress |= record
                    .owner
                    .compare_exchange(word, word & !0xffff_ffff, AcqRel, Relaxed)
                    .is_ok();
                continue;
            }
            let (a, b) = match stripes {
                [Some(a), Some(b)] => (a.min(b), Some(a.max(b)).filter(|&m| m != a.min(b))),
                [Some(a), None] | [None, Some(a)] => (a, None),
                [None, None] => continue,
            };
            let first = self.lock_stripe(a)?;
            let second = b.map(|b| self.lock_stripe(b)).transpose()?;
            drop(second);
            drop(first);
            progress = true;
        }
        Ok(progress)
    }

    /// The slot holding `name`, if the account exists. Caller holds the name's stripe.
    fn find(&self, tag: u64, name: &AccountName) -> Option<u64> {
        let geometry = self.region.geometry();
        let words = crate::name::words(name);
        let mask = geometry.table_slots - 1;
        let mut i = geometry.home_of(tag);
        for _ in 0..geometry.table_slots {
            let slot = self.slot(i);
            let t = slot.tag.load(Acquire);
            if t == FREE {
                return None;
            }
            if t == tag && slot.holds(tag, name, &words) {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
        None
    }

    /// Creates account `name` with balance 0 in the first free or tombstone slot of its probe
    /// chain, recording the creation in `entry` (of stripe `s`, which the caller holds) so a
    /// death from here on un-creates it. `LedgerFull` (nothing changed) at capacity.
    fn create(
        &self,
        claim: &Claim<'_>,
        entry: usize,
        s: u32,
        name: &AccountName,
        tag: u64,
    ) -> Result<u64, OpError> {
        let _alloc = self.lock_alloc()?;
        let header = self.region.header();
        let geometry = self.region.geometry();
        let count = header.count.load(Relaxed);
        if count >= geometry.capacity {
            return Err(OpError::LedgerFull);
        }
        let mask = geometry.table_slots - 1;
        let mut i = geometry.home_of(tag);
        let mut found = None;
        for _ in 0..geometry.table_slots {
            let t = self.slot(i).tag.load(Relaxed);
            if t == FREE || t == TOMB {
                found = Some((i, t));
                break;
            }
            i = (i + 1) & mask;
        }
        // count < capacity < table_slots guarantees a non-live slot; None means corruption.
        let (i, old_tag) = found.ok_or(OpError::LedgerFull)?;
        let record = claim.record();
        record.entries[entry].set(s, i, 0, tag);
        crash_point();
        header.journal.open(i, old_tag, count);
        crash_point();
        let slot = self.slot(i);
        slot.balance.store(0, Relaxed);
        slot.name_len.store(crate::name::stored_len(name), Relaxed);
        for (w, n) in slot.name.iter().zip(crate::name::words(name)) {
            w.store(n, Relaxed);
        }
        crash_point();
        slot.tag.store(tag, Release);
        crash_point();
        header.count.store(count + 1, Relaxed);
        crash_point();
        header.journal.state.store(IDLE, Release);
        crash_point();
        Ok(i)
    }

    /// Adds `delta` to (or subtracts from) stripe `s`'s running total.
    fn adjust_total(&self, s: u32, add: u64, sub: u64) {
        let stripe = self.region.stripe(s);
        let total = (u128::from(stripe.total_hi.load(Relaxed)) << 64)
            | u128::from(stripe.total_lo.load(Relaxed));
        self.store_total(s, total + u128::from(add) - u128::from(sub));
    }

    pub(crate) fn store_total(&self, s: u32, total: u128) {
        let stripe = self.region.stripe(s);
        stripe.total_lo.store(total as u64, Relaxed);
        stripe.total_hi.store((total >> 64) as u64, Relaxed);
    }

    /// The common end of DEPOSIT and WITHDRAW, once the undo entry (record entry 0) holds
    /// the before-image: writes the new balance, moves the stripe total by `(add, sub)`, then
    /// commits (`commit_change`: the redo record under `--fsync always`) and retires the
    /// entry.
    fn commit_balance(
        &self,
        claim: &Claim<'_>,
        (acct, s, i): (&AccountName, u32, u64),
        new: u64,
        (add, sub): (u64, u64),
    ) -> Result<(), OpError> {
        crash_point();
        let slot = self.slot(i);
        slot.balance.store(new, Relaxed);
        crash_point();
        self.adjust_total(s, add, sub);
        let logged = self.commit_change(claim.index, &[(acct, new)]);
        crash_point();
        claim.record().entries[0].clear();
        crash_point();
        logged
    }

    /// Adds `amount` to `acct`, opening it if new. Errors, checked in this order:
    /// `BadAmount`, then `Overflow` (existing account) or `LedgerFull` (new account).
    /// Returns the new balance.
    pub fn deposit(&self, acct: &AccountName, amount: u64) -> Result<u64, OpError> {
        self.guarded(Access::Write, || self.apply_deposit(acct, amount))
    }

    fn apply_deposit(&self, acct: &AccountName, amount: u64) -> Result<u64, OpError> {
        check_amount(amount)?;
        self.check_log_room()?;
        let tag = self.tag_of(acct);
        let s = self.stripe_of(tag);
        let claim = self.claim()?;
        crash_point();
        let _stripe = self.lock_stripe(s)?;
        crash_point();
        let entry = &claim.record().entries[0];
        let (i, new) = match self.find(tag, acct) {
            Some(i) => {
                let before = self.slot(i).balance.load(Relaxed);
                let new = before
                    .checked_add(amount)
                    .filter(|&b| b <= MAX_AMOUNT)
                    .ok_or(OpError::Overflow)?;
                entry.set(s, i, before, 0);
                (i, new)
            }
            None => (self.create(&claim, 0, s, acct, tag)?, amount),
        };
        self.commit_balance(&claim, (acct, s, i), new, (amount, 0))?;
        Ok(new)
    }

    /// Takes `amount` from `acct`. Errors, in order: `BadAmount`, `NoSuchAccount`,
    /// `InsufficientFunds`. An account emptied to 0 stays open. Returns the new balance.
    pub fn withdraw(&self, acct: &AccountName, amount: u64) -> Result<u64, OpError> {
        self.guarded(Access::Write, || self.apply_withdraw(acct, amount))
    }

    fn apply_withdraw(&self, acct: &AccountName, amount: u64) -> Result<u64, OpError> {
        check_amount(amount)?;
        self.check_log_room()?;
        let tag = self.tag_of(acct);
        let s = self.stripe_of(tag);
        let claim = self.claim()?;
        let _stripe = self.lock_stripe(s)?;
        crash_point();
        let i = self.find(tag, acct).ok_or(OpError::NoSuchAccount)?;
        let slot = self.slot(i);
        let before = slot.balance.load(Relaxed);
        let new = before
            .checked_sub(amount)
            .ok_or(OpError::InsufficientFunds)?;
        let entry = &claim.record().entries[0];
        entry.set(s, i, before, 0);
        self.commit_balance(&claim, (acct, s, i), new, (0, amount))?;
        Ok(new)
    }

    /// Moves `amount` from `from` to `to`, opening `to` if new. Errors, in order:
    /// `BadAmount`, `SameAccount` (decided on the names alone, so a missing account sent to
    /// itself is `SameAccount`), `NoSuchAccount` (`from`), `InsufficientFunds`, then
    /// `Overflow` (existing `to`) or `LedgerFull` (new `to`). Returns both new balances.
    pub fn transfer(
        &self,
        from: &AccountName,
        to: &AccountName,
        amount: u64,
    ) -> Result<(u64, u64), OpError> {
        self.guarded(Access::Write, || self.apply_transfer(from, to, amount))
    }

    fn apply_transfer(
        &self,
        from: &AccountName,
        to: &AccountName,
        amount: u64,
    ) -> Result<(u64, u64), OpError> {
        check_amount(amount)?;
        self.check_log_room()?;
        if from == to {
            return Err(OpError::SameAccount);
        }
        let (tag_from, tag_to) = (self.tag_of(from), self.tag_of(to));
        let (sf, st) = (self.stripe_of(tag_from), self.stripe_of(tag_to));
        let claim = self.claim()?;
        // Fixed lock order: ascending stripe index.
        let _first = self.lock_stripe(sf.min(st))?;
        crash_point();
        let _second = if sf != st {
            Some(self.lock_stripe(sf.max(st))?)
        } else {
            None
        };
        crash_point();
        let fi = self.find(tag_from, from).ok_or(OpError::NoSuchAccount)?;
        let from_before = self.slot(fi).balance.load(Relaxed);
        let from_new = from_before
            .checked_sub(amount)
            .ok_or(OpError::InsufficientFunds)?;
        let record = claim.record();
        let (ti, to_before) = match self.find(tag_to, to) {
            Some(ti) => {
                let to_before = self.slot(ti).balance.load(Relaxed);
                if to_before > MAX_AMOUNT - amount {
                    return Err(OpError::Overflow);
                }
                record.entries[1].set(st, ti, to_before, 0);
                (ti, to_before)
            }
            None => (self.create(&claim, 1, st, to, tag_to)?, 0),
        };
        crash_point();
        record.entries[0].set(sf, fi, from_before, 0);
        crash_point();
        self.slot(fi).balance.store(from_new, Relaxed);
        crash_point();
        self.slot(ti).balance.store(to_before + amount, Relaxed);
        crash_point();
        self.adjust_total(sf, 0, amount);
        self.adjust_total(st, amount, 0);
        crash_point();
        // Both halves are written: from here a repair of either stripe keeps them.
        let to_new = to_before + amount;
        let logged = self.commit_change(claim.index, &[(from, from_new), (to, to_new)]);
        crash_point();
        record.entries[0].clear();
        crash_point();
        record.entries[1].clear();
        crash_point();
        logged?;
        Ok((from_new, to_new))
    }

    /// The balance of `acct`, or `NoSuchAccount`.
    pub fn balance(&self, acct: &AccountName) -> Result<u64, OpError> {
        self.guarded(Access::Read, || {
            let tag = self.tag_of(acct);
            let _stripe = self.lock_stripe(self.stripe_of(tag))?;
            let i = self.find(tag, acct).ok_or(OpError::NoSuchAccount)?;
            Ok(self.slot(i).balance.load(Relaxed))
        })
    }

    /// The exact total of all balances and the number of accounts, as one snapshot: takes
    /// every stripe in ascending order (repairing any whose holder died), then the allocation
    /// lock, so no operation is half applied in what it reads. O(stripes), no table scan.
    /// Errs only with `Unrecoverable` or `FileFault`.
    pub fn audit(&self) -> Result<Audit, OpError> {
        self.guarded(Access::Read, || self.exact_audit())
    }

    fn exact_audit(&self) -> Result<Audit, OpError> {
        let _all = self.lock_all_stripes()?;
        let _alloc = self.lock_alloc()?;
        // With every lock held, nothing moves: the lock-free read is exact.
        Ok(self.approximate_audit())
    }
}

impl Ledger {
    /// The total and account count read without any lock (for monitoring: the master takes
    /// no ledger lock). Not a consistent snapshot: an operation in progress may be half
    /// counted. [`Ledger::audit`] is the exact one. It reads the mapping whatever the file's
    /// health ([`Ledger::overview`] checks it).
    pub fn approximate_audit(&self) -> Audit {
        let total = (0..self.region.geometry().stripes)
            .map(|s| {
                let stripe = self.region.stripe(s);
                (u128::from(stripe.total_hi.load(Relaxed)) << 64)
                    | u128::from(stripe.total_lo.load(Relaxed))
            })
            .sum();
        Audit {
            total,
            accounts: self.region.header().count.load(Relaxed),
        }
    }

    /// How many times a lock was repaired after its holder died, over the file's life.
    pub(crate) fn recoveries(&self) -> u64 {
        self.region.header().recoveries.load(Relaxed)
    }
}

impl Ledger {
    /// Takes every stripe, in ascending order: no operation is in flight while they are held.
    pub(crate) fn lock_all_stripes(&self) -> Result<AllStripes<'_>, OpError> {
        let mut all = AllStripes {
            ledger: self,
            held: 0,
        };
        for s in 0..self.region.geometry().stripes {
            let guard = self.lock_stripe(s)?;
            std::mem::forget(guard);
            all.held += 1;
        }
        Ok(all)
    }
}

/// Stripes 0..held, locked by `lock_all_stripes` (without a Vec: a forked test child may audit);
/// unlocked in descending order on drop.
pub(crate) struct AllStripes<'a> {
    ledger: &'a Ledger,
    held: u32,
}

impl Drop for AllStripes<'_> {
    fn drop(&mut self) {
        for s in (0..self.held).rev() {
            self.ledger.region.stripe(s).lock.unlock();
        }
    }
}
