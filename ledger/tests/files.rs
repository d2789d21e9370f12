//! Bad ledger files: truncated, garbage, wrong version, damaged header or contents. Each
//! gives an error naming the file, and the file is left byte-for-byte untouched. And files
//! that fail under an open ledger: truncated, extended, deleted, replaced, overwritten.

use std::fs;
use std::path::{Path, PathBuf};

use forkpool_ledger::{
    AccountName, FileFault, Health, Ledger, LedgerError, LedgerOptions, OpError, Problem, Structure,
};

fn options() -> LedgerOptions {
    LedgerOptions {
        max_accounts: 100,
        stripes: 4,
        intent_records: 4,
        ..LedgerOptions::default()
    }
}

/// A valid ledger file with one account, closed.
fn valid_file(dir: &Path) -> PathBuf {
    let path = dir.join("ledger.bin");
    let ledger = Ledger::open(&path, &options()).expect("create");
    ledger
        .deposit(&AccountName::new(b"alice").expect("name"), 42)
        .expect("deposit");
    path
}

/// Opens `path` expecting an error; checks the message names the file and the bytes are
/// unchanged.
fn refused(path: &Path) -> LedgerError {
    let before = fs::read(path).expect("read file");
    let err = Ledger::open(path, &options()).expect_err("a bad file is refused");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "message names the file: {err}"
    );
    assert!(
        fs::read(path).expect("read file") == before,
        "file untouched: {err}"
    );
    err
}

#[test]
fn truncated_file_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = valid_file(dir.path());
    let len = fs::metadata(&path).expect("stat").len();
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_len(len - 4096).expect("truncate");
    assert!(matches!(refused(&path), LedgerError::Truncated { .. }));
    file.set_len(40).expect("truncate into the header");
    assert!(matches!(refused(&path), LedgerError::Truncated { .. }));
    file.set_len(0).expect("truncate to nothing");
    assert!(matches!(
        refused(&path),
        LedgerError::Truncated { actual: 0, .. }
    ));
}

#[test]
fn garbage_file_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.bin");
    fs::write(&path, b"this is not a ledger, just some text\n".repeat(300)).expect("write");
    assert!(matches!(refused(&path), LedgerError::BadMagic { .. }));
}

#[test]
fn other_layout_version_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = valid_file(dir.path());
    let mut bytes = fs::read(&path).expect("read");
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    fs::write(&path, &bytes).expect("write");
    assert!(matches!(
        refused(&path),
        LedgerError::WrongVersion {
            found: 2,
            expected: 1,
            ..
        }
    ));
}

#[test]
fn damaged_header_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = valid_file(dir.path());
    let mut bytes = fs::read(&path).expect("read");
    bytes[20] ^= 0x10; // inside the capacity field
    fs::write(&path, &bytes).expect("write");
    assert!(matches!(refused(&path), LedgerError::Corrupt { .. }));
}

#[test]
fn extra_bytes_are_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = valid_file(dir.path());
    let mut bytes = fs::read(&path).expect("read");
    bytes.extend_from_slice(&[0; 100]);
    fs::write(&path, &bytes).expect("write");
    assert!(matches!(refused(&path), LedgerError::Corrupt { .. }));
}

#[test]
fn garbage_in_the_account_table_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = valid_file(dir.path());
    let mut bytes = fs::read(&path).expect("read");
    // Find alice's name in the table and damage one byte of it.
    let at = bytes
        .windows(5)
        .position(|w| w == b"alice")
        .expect("the name is stored in the file");
    bytes[at] = b'!';
    fs::write(&path, &bytes).expect("write");
    match refused(&path) {
        LedgerError::Damaged { finding, .. } => {
            assert!(matches!(finding.structure, Structure::Slot(_)), "{finding}");
            assert_eq!(finding.problem, Problem::InvalidName);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_directory_in_place_of_the_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.bin");
    fs::create_dir(&path).expect("mkdir");
    let err = Ledger::open(&path, &options()).expect_err("a directory is not a ledger");
    assert!(err.to_string().contains("ledger.bin"), "{err}");
}

// ---------------------------------------------------------------------------------------
// The file failing under an open ledger
// ---------------------------------------------------------------------------------------

/// An open ledger with alice = 42, and its path.
fn open_with_alice(dir: &Path) -> (Ledger, PathBuf) {
    let path = valid_file(dir);
    let ledger = Ledger::open(&path, &options()).expect("reopen");
    (ledger, path)
}

fn alice() -> AccountName {
    AccountName::new(b"alice").expect("name")
}

#[test]
fn a_truncated_file_fails_every_operation_instead_of_the_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ledger, path) = open_with_alice(dir.path());
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(4096)
        .expect("truncate");
    // No inspection yet: the operation meets the missing pages itself.
    let unreadable = Err(OpError::FileFault(FileFault::Unreadable));
    assert_eq!(ledger.deposit(&alice(), 1), unreadable);
    assert_eq!(ledger.balance(&alice()), unreadable);
    assert_eq!(
        ledger.audit(),
        Err(OpError::FileFault(FileFault::Unreadable))
    );
    assert_eq!(ledger.health(), Health::Failed(FileFault::Unreadable));
    assert!(ledger.lock_holders().is_empty());
    let overview = ledger.overview();
    assert_eq!((overview.audit, overview.recoveries), (None, None));
    assert_eq!(ledger.check_file(), Health::Failed(FileFault::Unreadable));
    assert_eq!(
        OpError::FileFault(FileFault::Unreadable).kind().as_str(),
        "internal"
    );
}

/// Something done to the file at a path.
type Damage = fn(&Path);

#[test]
fn the_inspection_finds_a_resized_deleted_replaced_or_overwritten_file() {
    let cases: [(&str, Damage, FileFault); 4] = [
        (
            "extended",
            |path| {
                let len = fs::metadata(path).expect("stat").len();
                let file = fs::OpenOptions::new().write(true).open(path).expect("open");
                file.set_len(len + 4096).expect("extend");
            },
            FileFault::Resized,
        ),
        (
            "deleted",
            |path| fs::remove_file(path).expect("rm"),
            FileFault::Deleted,
        ),
        (
            "replaced",
            |path| {
                let copy = path.with_extension("copy");
                fs::copy(path, &copy).expect("cp");
                fs::rename(&copy, path).expect("mv");
            },
            FileFault::Replaced,
        ),
        (
            "overwritten in place",
            |path| {
                let bytes = fs::read(path).expect("read");
                fs::write(path, bytes).expect("write the same bytes over it");
            },
            FileFault::Written,
        ),
    ];
    for (what, damage, fault) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ledger, path) = open_with_alice(dir.path());
        assert_eq!(ledger.check_file(), Health::Healthy, "{what}");
        damage(&path);
        assert_eq!(ledger.check_file(), Health::Failed(fault), "{what}");
        assert_eq!(
            ledger.deposit(&alice(), 1),
            Err(OpError::FileFault(fault)),
            "{what}: writes are refused"
        );
        let reads = if fault.refuses_reads() {
            Err(OpError::FileFault(fault))
        } else {
            Ok(42)
        };
        assert_eq!(ledger.balance(&alice()), reads, "{what}");
        // The first fault stays.
        assert_eq!(ledger.check_file(), Health::Failed(fault), "{what}");
    }
}
