-- Scan faults: a rejection is a short code plus a detail; the scan configuration of a
-- bucket+prefix is stored once and with every dataset version it produced.
-- Every statement is safe to re-run: `migrate` treats a duplicate column from an interrupted
-- earlier run as applied (MySQL 8.4 has no ADD COLUMN IF NOT EXISTS).

ALTER TABLE images ADD COLUMN reject_detail VARCHAR(1024) NULL AFTER reject_reason;

CREATE TABLE IF NOT EXISTS scan_configs (
    bucket VARCHAR(63) NOT NULL,
    prefix VARCHAR(512) NOT NULL,
    prefix_hash CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    config JSON NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    PRIMARY KEY (bucket, prefix_hash)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

ALTER TABLE dataset_versions ADD COLUMN scan_config JSON NULL;

ALTER TABLE dataset_versions ADD COLUMN excluded_labels JSON NULL;
