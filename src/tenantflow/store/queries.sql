-- The run store's statements, one per name (loaded by store/queries.py).
--
-- An entry starts with a line "-- name --"; the comment lines under it say why it is so.
-- "{name}" includes another entry (a fragment: columns, a fence, a clause); "{RunStatus.X}",
-- "{StepStatus.X}", "{TERMINAL}" and "{UNFINISHED}" are those values, quoted, from
-- store/records.py. Left for later: "{for_update}" and "{for_share}" (row locks on
-- PostgreSQL, nothing on SQLite: store/db.py) and "{many:...}" (the text in it, repeated for
-- each item of a list). Placeholders are "?". Every output column has a name (use AS): rows
-- are read by it.

-- run_columns --
-- A RunRecord's columns (RunRecord.from_row).
id, workflow, status, input, result, error, idempotency_key, parent_id, priority, created_at,
updated_at, started_at, finished_at, deadline, wake_at, recoveries, executions,
cancel_requested, compensable, stuck_reason

-- step_columns --
-- A StepRecord's columns, in the order of StepRecord.params.
run_id, seq, name, kind, status, output, error, attempts, started_at, finished_at

-- owned --
-- The fence: the run is executed under this lease, its owner and its attempt (executions,
-- which every claim increments). Checked by the very statement that writes, or first in the
-- transaction, whose row lock then holds it. Parameters: lease owner, attempt.
lease_owner = ? AND executions = ? AND status = {RunStatus.RUNNING}

-- step_conflict --
-- A checkpoint written again (a pending wait that ends, a step retried) replaces its outcome.
ON CONFLICT (run_id, seq) DO UPDATE SET status = excluded.status, output = excluded.output,
error = excluded.error, attempts = excluded.attempts, finished_at = excluded.finished_at

-- ------------------------------------------------------------------------------------------
-- The hot path: submit, claim, checkpoint, finish. On PostgreSQL each is one statement of the
-- group commit (prepared once per connection); the general transactions below handle the rest.

-- insert_run --
INSERT INTO runs (id, workflow, status, input, idempotency_key, parent_id, priority, timeout,
max_recoveries, created_at, updated_at, trace)
VALUES (?, ?, {RunStatus.QUEUED}, ?, ?, ?, ?, ?, ?, ?, ?, ?)

-- create_run_pg --
-- The run and its outbox record in one round trip; no row: the id or key is taken already.
WITH ins AS ({insert_run} ON CONFLICT DO NOTHING RETURNING id, priority, trace),
ob AS (INSERT INTO outbox (run_id, priority, created_at, trace)
       SELECT id, priority, ?, trace FROM ins RETURNING id)
SELECT ob.id FROM ob

-- claim_queued --
-- The common claim: a queued run within its deadline. No row: the general claim decides.
UPDATE runs SET status = {RunStatus.RUNNING}, lease_owner = ?, lease_until = ?,
executions = executions + 1, started_at = COALESCE(started_at, ?),
deadline = COALESCE(deadline, ? + timeout), wake_at = NULL, stuck_reason = NULL, updated_at = ?
WHERE id = ? AND status = {RunStatus.QUEUED} AND (deadline IS NULL OR deadline > ?)
RETURNING {run_columns}

-- touch_owned --
UPDATE runs SET updated_at = ? WHERE id = ? AND {owned} RETURNING cancel_requested

-- insert_step --
INSERT INTO steps ({step_columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)

-- upsert_step --
{insert_step} {step_conflict}

-- insert_fenced_step --
-- PostgreSQL: the checkpoint only if the CTE "fenced" returned a row (the lease holds). The
-- casts type the parameters, which a SELECT list does not.
INSERT INTO steps ({step_columns})
SELECT ?::text, ?::int, ?::text, ?::text, ?::text, ?::bytea, ?::bytea, ?::int, ?::float8,
?::float8 FROM fenced {step_conflict} RETURNING 1 AS done

-- record_step_pg --
WITH fenced AS ({touch_owned}), ins AS ({insert_fenced_step})
SELECT cancel_requested FROM fenced

-- finish_owned --
-- The end of a run with no parent to wake, fenced.
UPDATE runs SET status = ?, result = ?, error = ?, finished_at = ?, updated_at = ?,
lease_owner = NULL, lease_until = NULL, wake_at = NULL
WHERE id = ? AND {owned} AND parent_id IS NULL RETURNING id

-- finish_with_step_pg --
WITH fenced AS ({finish_owned}), ins AS ({insert_fenced_step}) SELECT id FROM fenced

-- ------------------------------------------------------------------------------------------
-- Runs.

-- insert_outbox --
-- The record carries the run's trace context (its origin's traceparent) to the message.
INSERT INTO outbox (run_id, priority, created_at, trace)
SELECT id, ?, ?, trace FROM runs WHERE id = ? RETURNING id, trace

-- insert_run_returning --
{insert_run} ON CONFLICT DO NOTHING RETURNING {run_columns}

-- count_run --
INSERT INTO usage (period, runs) VALUES (?, 1)
ON CONFLICT (period) DO UPDATE SET runs = usage.runs + 1 RETURNING runs

-- get_run --
SELECT {run_columns} FROM runs WHERE id = ?

-- get_run_by_key --
SELECT {run_columns} FROM runs WHERE idempotency_key = ?

-- list_runs --
-- Newest first; {filters} is empty or WHERE and the list_runs_* conditions asked for.
SELECT {run_columns} FROM runs {filters} ORDER BY id DESC LIMIT ?

-- list_runs_status --
status = ?

-- list_runs_workflow --
workflow = ?

-- list_runs_before --
id < ?

-- count_runs --
SELECT COUNT(*) AS count FROM runs

-- count_runs_with_status --
SELECT COUNT(*) AS count FROM runs WHERE status = ?

-- steps_of_run --
SELECT {step_columns} FROM steps WHERE run_id = ? ORDER BY seq

-- ------------------------------------------------------------------------------------------
-- Execution.

-- claim_read --
-- The general claim reads the run, locked, with what decides whether it may go on.
SELECT {run_columns}, lease_until, timeout, max_recoveries FROM runs WHERE id = ? {for_update}

-- claim --
UPDATE runs SET status = {RunStatus.RUNNING}, lease_owner = ?, lease_until = ?, recoveries = ?,
executions = executions + 1, started_at = COALESCE(started_at, ?), deadline = ?,
wake_at = NULL, stuck_reason = NULL, updated_at = ? WHERE id = ? RETURNING {run_columns}

-- renew_leases --
UPDATE runs SET lease_until = ?
WHERE status = {RunStatus.RUNNING} AND (id, lease_owner, executions) IN (VALUES {many:(?, ?, ?)})
RETURNING id, cancel_requested

-- mark_compensable --
UPDATE runs SET compensable = TRUE WHERE id = ?

-- step_output --
SELECT output FROM steps WHERE run_id = ? AND seq = ?

-- next_event --
SELECT id, payload FROM events WHERE run_id = ? AND name = ? AND consumed_seq IS NULL
ORDER BY id LIMIT 1

-- consume_event --
UPDATE events SET consumed_seq = ? WHERE id = ?

-- receive_event_step --
UPDATE steps SET status = {StepStatus.COMPLETED}, output = ?, finished_at = ?
WHERE run_id = ? AND seq = ?

-- time_out_event_step --
UPDATE steps SET status = {StepStatus.COMPLETED}, output = NULL, finished_at = ?
WHERE run_id = ? AND seq = ?

-- insert_step_once --
{insert_step} ON CONFLICT DO NOTHING

-- insert_child --
{insert_run} ON CONFLICT (id) DO NOTHING RETURNING id

-- child_state --
SELECT status, result, error FROM runs WHERE id = ?

-- end_child_step --
UPDATE steps SET status = ?, output = ?, error = ?, finished_at = ? WHERE run_id = ? AND seq = ?

-- child_status_shared --
-- Locks the child's row before its parent's, in the order a child's end takes them.
SELECT status FROM runs WHERE id = ? {for_share}

-- suspend --
UPDATE runs SET status = ?, wake_at = ?, lease_owner = NULL, lease_until = NULL,
updated_at = ? WHERE id = ?

-- release --
UPDATE runs SET status = {RunStatus.QUEUED}, lease_owner = NULL, lease_until = NULL,
stuck_reason = ?, updated_at = ? WHERE id = ? AND {owned}

-- finish --
UPDATE runs SET status = ?, result = ?, error = ?, finished_at = ?, updated_at = ?,
lease_owner = NULL, lease_until = NULL, wake_at = NULL WHERE id = ? RETURNING parent_id

-- wake --
UPDATE runs SET status = {RunStatus.QUEUED}, wake_at = NULL, updated_at = ?
WHERE id = ? AND status = {RunStatus.WAITING} RETURNING id, priority

-- requeue --
UPDATE runs SET status = {RunStatus.QUEUED}, wake_at = NULL, updated_at = ? WHERE id = ?
RETURNING priority

-- open_children --
SELECT id, status, compensable FROM runs WHERE parent_id = ? AND status NOT IN ({TERMINAL})

-- flag_cancel --
UPDATE runs SET cancel_requested = TRUE WHERE id = ?

-- lock_descendants --
-- Child ids extend their parent's ("{parent}.{seq}"): descending id order is deepest first.
WITH RECURSIVE tree(id) AS (SELECT id FROM runs WHERE parent_id = ?
  UNION SELECT r.id FROM runs r JOIN tree t ON r.parent_id = t.id)
SELECT id FROM runs WHERE id IN (SELECT id FROM tree) ORDER BY id DESC {for_update}

-- ------------------------------------------------------------------------------------------
-- Control from clients.

-- lock_run --
SELECT {run_columns} FROM runs WHERE id = ? {for_update}

-- request_cancel --
UPDATE runs SET cancel_requested = TRUE, updated_at = ? WHERE id = ?

-- lock_run_status --
SELECT status FROM runs WHERE id = ? {for_update}

-- insert_event --
INSERT INTO events (run_id, name, payload, created_at) VALUES (?, ?, ?, ?)

-- cancel_requested --
SELECT id FROM runs WHERE cancel_requested AND id IN ({many:?})

-- ------------------------------------------------------------------------------------------
-- Outbox and reconciliation.

-- delete_outbox --
DELETE FROM outbox WHERE id IN ({many:?})

-- pending_outbox --
SELECT id, run_id, priority, trace FROM outbox WHERE created_at < ? ORDER BY id LIMIT ?

-- stalled_runs --
-- Runs that should have a message by now: queued, running with a lapsed lease, or
-- sleeping or waiting past their wake-up, since before the cutoff.
SELECT id, priority, trace FROM runs
WHERE (status = {RunStatus.QUEUED} AND updated_at < ?)
OR (status = {RunStatus.RUNNING} AND lease_until < ?)
OR (status IN ({RunStatus.SLEEPING}, {RunStatus.WAITING}) AND wake_at < ?)
ORDER BY id LIMIT ?

-- expected_messages --
-- A waiting run without a wake-up (an event without a timeout, a child) is woken by what it
-- waits for, whose change enqueues it: it expects no message.
SELECT id, priority, trace,
CASE status WHEN {RunStatus.QUEUED} THEN NULL WHEN {RunStatus.RUNNING} THEN lease_until
  ELSE wake_at END AS due_at
FROM runs
WHERE (status IN ({RunStatus.QUEUED}, {RunStatus.RUNNING})
  OR (status IN ({RunStatus.SLEEPING}, {RunStatus.WAITING}) AND wake_at IS NOT NULL))
AND id > ? ORDER BY id LIMIT ?

-- has_unfinished --
SELECT EXISTS (SELECT 1 FROM runs WHERE status IN ({UNFINISHED}))
OR EXISTS (SELECT 1 FROM outbox) AS unfinished

-- stuck_runs --
SELECT COUNT(*) AS count, MIN(updated_at) AS oldest FROM runs
WHERE status IN ({RunStatus.QUEUED}, {RunStatus.RUNNING}) AND updated_at < ?

-- ping --
SELECT 1 AS one
