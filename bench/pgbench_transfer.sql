-- The bank's TRANSFER as PgBank runs it (pgledger/src/txn.rs), for pgbench -M prepared:
-- both accounts locked in ascending name order, both balances written, the request's id and
-- reply recorded, one transaction. The balance checks PgBank makes in Rust between the reads
-- and the writes have no SQL here (they cannot fail with the benchmark's balances).
-- Accounts are a000000 .. a<accounts-1>, as pgledger/examples/pgbank_transfer.rs creates them.
\set from random(0, :accounts - 1)
\set to (:from + 1 + random(0, :accounts - 2)) % :accounts
\set lo least(:from, :to)
\set hi greatest(:from, :to)
\set amount random(1, 100)
\set seq random(1, 9223372036854775807)
BEGIN;
SELECT balance FROM accounts WHERE name = 'a' || lpad(:lo::text, 6, '0') FOR UPDATE;
SELECT balance FROM accounts WHERE name = 'a' || lpad(:hi::text, 6, '0') FOR UPDATE;
UPDATE accounts SET balance = balance - :amount WHERE name = 'a' || lpad(:from::text, 6, '0');
UPDATE accounts SET balance = balance + :amount WHERE name = 'a' || lpad(:to::text, 6, '0');
INSERT INTO applied_requests (origin, seq, amount, reply) VALUES (-1 - :client_id, :seq, :amount, 'OK 0 0');
END;
