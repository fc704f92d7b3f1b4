-- Registry mirror: one row per registered model version with the promotion gate's decision, and
-- every move of an alias (champion / challenger), so "which model was champion on date X" is one
-- query. MLflow stays the source of truth for aliases; these rows are written by the same calls.

CREATE TABLE IF NOT EXISTS model_versions (
    model_name VARCHAR(255) NOT NULL,
    model_version INT UNSIGNED NOT NULL,
    run_id VARCHAR(64) NOT NULL,
    dataset_version VARCHAR(64) NOT NULL,
    airflow_run_id VARCHAR(255) NULL,
    image_size INT NOT NULL,
    n_classes INT NOT NULL,
    val_accuracy DOUBLE NULL,
    gate_accuracy DOUBLE NULL,
    champion_version INT UNSIGNED NULL,
    champion_accuracy DOUBLE NULL,
    decision VARCHAR(32) NULL,
    decision_reason VARCHAR(512) NULL,
    created_at DATETIME(6) NOT NULL,
    decided_at DATETIME(6) NULL,
    PRIMARY KEY (model_name, model_version),
    KEY ix_model_versions_dataset (dataset_version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS alias_history (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    model_name VARCHAR(255) NOT NULL,
    alias VARCHAR(64) NOT NULL,
    from_version INT UNSIGNED NULL,
    to_version INT UNSIGNED NOT NULL,
    actor VARCHAR(255) NOT NULL,
    reason VARCHAR(512) NOT NULL,
    moved_at DATETIME(6) NOT NULL,
    KEY ix_alias_history_lookup (model_name, alias, moved_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- The current target of every alias, as recorded (latest move wins).
CREATE OR REPLACE VIEW v_current_aliases AS
SELECT h.model_name, h.alias, h.to_version AS model_version, h.moved_at, h.actor, h.reason
FROM alias_history h
WHERE h.id = (
    SELECT MAX(h2.id) FROM alias_history h2
    WHERE h2.model_name = h.model_name AND h2.alias = h.alias
);
