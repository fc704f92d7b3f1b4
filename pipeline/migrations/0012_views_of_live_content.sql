-- The accuracy and confusion views count only predictions of live, accepted images whose content
-- is still the one scored (`p.etag = i.etag`), as evaluation and the other views do (0009): a
-- test image moved to another label folder, deleted, rejected later (a label conflict) or
-- overwritten no longer counts with its old truth. The disagreements view leaves out deleted
-- and rejected images too (their thumbnails are gone).

CREATE OR REPLACE VIEW v_accuracy_by_model_version AS
SELECT p.model_name, p.model_version, a.alias,
       COUNT(*) AS n_labelled, SUM(p.correct) AS n_correct,
       SUM(p.correct) * 1e0 / COUNT(*) AS accuracy,
       e.macro_f1, e.evaluated_at, MAX(p.scored_at) AS last_scored_at
FROM predictions p
JOIN images i
    ON i.id = p.image_id AND i.etag = p.etag AND i.status = 'ok' AND i.deleted_at IS NULL
LEFT JOIN evaluations e ON e.model_name = p.model_name AND e.model_version = p.model_version
LEFT JOIN v_current_aliases a
    ON a.model_name = p.model_name AND a.model_version = p.model_version
    AND a.alias IN ('champion', 'challenger')
WHERE p.correct IS NOT NULL
GROUP BY p.model_name, p.model_version, a.alias, e.macro_f1, e.evaluated_at;

CREATE OR REPLACE VIEW v_champion_confusion AS
SELECT p.model_name, p.model_version, p.true_label, p.predicted_label, COUNT(*) AS n
FROM predictions p
JOIN v_current_aliases a
    ON a.model_name = p.model_name AND a.model_version = p.model_version AND a.alias = 'champion'
JOIN images i
    ON i.id = p.image_id AND i.etag = p.etag AND i.status = 'ok' AND i.deleted_at IS NULL
WHERE p.true_label IS NOT NULL
GROUP BY p.model_name, p.model_version, p.true_label, p.predicted_label;

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
    AND h.image_id = c.image_id AND h.etag = c.etag
JOIN images i
    ON i.id = c.image_id AND i.etag = c.etag AND i.status = 'ok' AND i.deleted_at IS NULL
WHERE ac.alias = 'champion' AND c.predicted_label <> h.predicted_label;
