-- Predictions: one row per (image, model name, model version), upserted by every scoring batch,
-- so a retried or killed-and-rerun shard overwrites and never duplicates. Evaluations per model
-- version (headline numbers, per-class metrics, confusion matrix), rewritten atomically by
-- `pipeline.score.evaluate`. Views answer the everyday questions; champion and challenger come
-- from `v_current_aliases` (migration 0002). Every statement is safe to re-run.

CREATE TABLE IF NOT EXISTS predictions (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    image_id BIGINT UNSIGNED NOT NULL,
    model_name VARCHAR(255) NOT NULL,
    model_version INT UNSIGNED NOT NULL,
    predicted_label VARCHAR(255) NOT NULL,
    confidence DOUBLE NOT NULL,
    top_k JSON NOT NULL,
    true_label VARCHAR(255) NULL,
    correct TINYINT NULL,
    subset VARCHAR(16) NOT NULL,
    dataset_version VARCHAR(64) NULL,
    mlflow_run_id VARCHAR(64) NOT NULL,
    airflow_run_id VARCHAR(255) NULL,
    scored_at DATETIME(6) NOT NULL,
    UNIQUE KEY uq_predictions_image_model (image_id, model_name, model_version),
    KEY ix_predictions_model_confidence (model_name, model_version, confidence),
    KEY ix_predictions_model_subset (model_name, model_version, subset)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS evaluations (
    model_name VARCHAR(255) NOT NULL,
    model_version INT UNSIGNED NOT NULL,
    n_images INT NOT NULL,
    n_correct INT NOT NULL,
    accuracy DOUBLE NOT NULL,
    macro_f1 DOUBLE NOT NULL,
    evaluated_at DATETIME(6) NOT NULL,
    PRIMARY KEY (model_name, model_version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- `precision` is a reserved word in MySQL, hence the *_score column names (as in scikit-learn).
CREATE TABLE IF NOT EXISTS evaluation_classes (
    model_name VARCHAR(255) NOT NULL,
    model_version INT UNSIGNED NOT NULL,
    label VARCHAR(255) NOT NULL,
    precision_score DOUBLE NOT NULL,
    recall_score DOUBLE NOT NULL,
    f1_score DOUBLE NOT NULL,
    support INT NOT NULL,
    PRIMARY KEY (model_name, model_version, label)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS confusion_matrix (
    model_name VARCHAR(255) NOT NULL,
    model_version INT UNSIGNED NOT NULL,
    true_label VARCHAR(255) NOT NULL,
    predicted_label VARCHAR(255) NOT NULL,
    n INT NOT NULL,
    PRIMARY KEY (model_name, model_version, true_label, predicted_label)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Accuracy of every model version on the labelled images it scored, live from `predictions`,
-- with macro-F1 from its last evaluation and the alias it holds now (NULL if none).
CREATE OR REPLACE VIEW v_accuracy_by_model_version AS
SELECT p.model_name, p.model_version, a.alias,
       COUNT(*) AS n_labelled, SUM(p.correct) AS n_correct,
       SUM(p.correct) * 1e0 / COUNT(*) AS accuracy,
       e.macro_f1, e.evaluated_at, MAX(p.scored_at) AS last_scored_at
FROM predictions p
LEFT JOIN evaluations e ON e.model_name = p.model_name AND e.model_version = p.model_version
LEFT JOIN v_current_aliases a
    ON a.model_name = p.model_name AND a.model_version = p.model_version
    AND a.alias IN ('champion', 'challenger')
WHERE p.correct IS NOT NULL
GROUP BY p.model_name, p.model_version, a.alias, e.macro_f1, e.evaluated_at;

-- Confusion matrix of the current champion on its labelled predictions: one row per
-- (true_label, predicted_label) pair that occurred; the diagonal is where they are equal.
CREATE OR REPLACE VIEW v_champion_confusion AS
SELECT p.model_name, p.model_version, p.true_label, p.predicted_label, COUNT(*) AS n
FROM predictions p
JOIN v_current_aliases a
    ON a.model_name = p.model_name AND a.model_version = p.model_version AND a.alias = 'champion'
WHERE p.true_label IS NOT NULL
GROUP BY p.model_name, p.model_version, p.true_label, p.predicted_label;

-- Review queue: the champion's predictions with confidence (top-1 probability) below 0.6, the
-- threshold below which a human should look; lowest confidence first. Live images only.
CREATE OR REPLACE VIEW v_review_queue AS
SELECT p.model_name, p.model_version, p.image_id, i.bucket, i.object_key, p.subset,
       p.predicted_label, p.confidence, p.top_k, p.true_label, p.scored_at
FROM predictions p
JOIN v_current_aliases a
    ON a.model_name = p.model_name AND a.model_version = p.model_version AND a.alias = 'champion'
JOIN images i ON i.id = p.image_id
WHERE p.confidence < 0.6 AND i.deleted_at IS NULL AND i.status = 'ok'
ORDER BY p.confidence, p.image_id;

-- Images both the champion and the challenger scored, where their top-1 labels differ.
CREATE OR REPLACE VIEW v_champion_challenger_disagreements AS
SELECT c.model_name, c.image_id, i.bucket, i.object_key, c.subset, c.true_label,
       c.model_version AS champion_version, c.predicted_label AS champion_label,
       c.confidence AS champion_confidence,
       h.model_version AS challenger_version, h.predicted_label AS challenger_label,
       h.confidence AS challenger_confidence
FROM v_current_aliases ac
JOIN v_current_aliases ah ON ah.model_name = ac.model_name AND ah.alias = 'challenger'
JOIN predictions c ON c.model_name = ac.model_name AND c.model_version = ac.model_version
JOIN predictions h
    ON h.model_name = ah.model_name AND h.model_version = ah.model_version
    AND h.image_id = c.image_id
JOIN images i ON i.id = c.image_id
WHERE ac.alias = 'champion' AND c.predicted_label <> h.predicted_label;

-- Every live inbox image with its most recent prediction (any model version; the highest
-- version wins a tie); the prediction columns are NULL until the image is scored.
CREATE OR REPLACE VIEW v_inbox_latest_predictions AS
SELECT i.id AS image_id, i.bucket, i.prefix, i.object_key, i.first_seen_at,
       p.model_name, p.model_version, p.predicted_label, p.confidence, p.top_k, p.scored_at
FROM images i
LEFT JOIN predictions p ON p.id = (
    SELECT p2.id FROM predictions p2 WHERE p2.image_id = i.id
    ORDER BY p2.scored_at DESC, p2.model_version DESC, p2.id DESC LIMIT 1
)
WHERE i.subset = 'inbox' AND i.status = 'ok' AND i.deleted_at IS NULL;
