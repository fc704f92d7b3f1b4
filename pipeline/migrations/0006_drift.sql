-- Drift: the embeddings a scoring run produced (kept between the shards and the check) and the
-- check's reports. `drift_embeddings` is written in the transaction of each scored batch, keyed
-- by (model, version, Airflow run, image): a retried shard leaves one row per image and run.
-- An embedding is the version's PCA projection (`drift_reference.safetensors`) of the image's
-- penultimate-layer features, float32 little-endian. `check_drift` upserts one report per
-- (model, version, run, subset) and deletes embeddings older than 30 days.
-- Every statement is safe to re-run.

CREATE TABLE IF NOT EXISTS drift_embeddings (
    model_name VARCHAR(255) NOT NULL,
    model_version INT UNSIGNED NOT NULL,
    airflow_run_id VARCHAR(255) NOT NULL,
    image_id BIGINT UNSIGNED NOT NULL,
    subset VARCHAR(16) NOT NULL,
    embedding VARBINARY(1024) NOT NULL,
    created_at DATETIME(6) NOT NULL,
    PRIMARY KEY (model_name, model_version, airflow_run_id, image_id),
    KEY ix_drift_embeddings_created (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- status: checked | not_enough_images | no_reference. p-values are permutation p-values; each
-- test is judged at p_value_threshold / 3. label_shift: total variation distance of the
-- predicted-label distributions (window against the reference sample of val).
CREATE TABLE IF NOT EXISTS drift_reports (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    model_name VARCHAR(255) NOT NULL,
    model_version INT UNSIGNED NOT NULL,
    airflow_run_id VARCHAR(255) NOT NULL,
    subset VARCHAR(16) NOT NULL,
    status VARCHAR(32) NOT NULL,
    n_images INT NOT NULL,
    n_reference INT NOT NULL,
    mmd2 DOUBLE NULL,
    mmd_p_value DOUBLE NULL,
    label_shift DOUBLE NULL,
    label_p_value DOUBLE NULL,
    reference_confidence DOUBLE NULL,
    mean_confidence DOUBLE NULL,
    confidence_drop DOUBLE NULL,
    confidence_p_value DOUBLE NULL,
    p_value_threshold DOUBLE NOT NULL,
    min_images INT NOT NULL,
    label_shift_threshold DOUBLE NOT NULL,
    confidence_drop_threshold DOUBLE NOT NULL,
    drifted TINYINT NOT NULL,
    reasons VARCHAR(64) NOT NULL,
    label_distribution JSON NULL,
    checked_at DATETIME(6) NOT NULL,
    UNIQUE KEY uq_drift_reports_run (model_name, model_version, airflow_run_id, subset),
    KEY ix_drift_reports_checked (model_name, checked_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Drift history, newest first per model when ordered by checked_at: one row per checked subset
-- of a run, with the verdict in words.
CREATE OR REPLACE VIEW v_drift_history AS
SELECT r.model_name, r.model_version, r.airflow_run_id, r.subset, r.checked_at, r.status,
       r.n_images, r.n_reference, r.mmd_p_value, r.label_shift, r.label_p_value,
       r.reference_confidence, r.mean_confidence, r.confidence_drop, r.p_value_threshold,
       r.drifted, r.reasons,
       CASE
           WHEN r.status = 'not_enough_images' THEN 'not enough images'
           WHEN r.status = 'no_reference' THEN 'no reference'
           WHEN r.drifted = 1 THEN CONCAT('drift: ', r.reasons)
           ELSE 'no drift'
       END AS verdict
FROM drift_reports r;
