-- The SHA-256 of every training checkpoint the pipeline saved, written as it saves one: a retry
-- resumes only from bytes whose digest is recorded here, in MySQL, which only the pipeline
-- writes. The work bucket that holds the checkpoints is MLflow's artifact bucket by default,
-- which MLflow's users can write through its artifact proxy: a checkpoint put there by anyone
-- else (their weights at the last epoch, registered as the pipeline's) is never resumed.
-- `location` is the checkpoint's place (`s3://bucket/key`, or a local path); keyed by its hash.
-- `sha256`: the digest of the last save whose upload finished; `pending_sha256`: of a save
-- being uploaded (written before the upload, moved to `sha256` after it). Both are accepted: a
-- save killed or failed mid-upload resumes from whichever of the two the store holds.

CREATE TABLE IF NOT EXISTS checkpoints (
    location_sha256 CHAR(64) NOT NULL PRIMARY KEY,
    location VARCHAR(2048) NOT NULL,
    sha256 CHAR(64) NULL,
    pending_sha256 CHAR(64) NULL,
    size_bytes BIGINT UNSIGNED NOT NULL,
    saved_at DATETIME(6) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
