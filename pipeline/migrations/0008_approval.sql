-- Approval of a promotion (run param `require_approval`): the gate's verdict `awaiting_approval`
-- waits for a person in Airflow's Required Actions. Their answer is kept with the version:
-- `review` is approved | rejected | timed_out, `reviewer` who answered (empty on a timeout),
-- `review_comment` what they wrote. An approval's alias move names the reviewer in
-- alias_history.actor. Safe to re-run: `migrate` treats a duplicate column as applied.

ALTER TABLE model_versions ADD COLUMN review VARCHAR(16) NULL AFTER decided_at;
ALTER TABLE model_versions ADD COLUMN reviewer VARCHAR(255) NULL AFTER review;
ALTER TABLE model_versions ADD COLUMN review_comment VARCHAR(1024) NULL AFTER reviewer;
ALTER TABLE model_versions ADD COLUMN reviewed_at DATETIME(6) NULL AFTER review_comment;
