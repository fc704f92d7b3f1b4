-- The content a prediction was made for: `etag` of the image when it was scored. An object
-- overwritten under the same key keeps its image id, so without it the old content's prediction
-- counted as "already scored" for the new content forever. Scoring now skips only predictions of
-- the image's current ETag, evaluation counts only those of the dataset version's members, and
-- the views show a prediction only while the image still holds the content it was made for.
-- Rows written before this migration are taken to be of the content catalogued now.

ALTER TABLE predictions ADD COLUMN etag VARCHAR(128) NULL AFTER image_id;

UPDATE predictions p JOIN images i ON i.id = p.image_id SET p.etag = i.etag WHERE p.etag IS NULL;

CREATE OR REPLACE VIEW v_review_queue AS
SELECT p.model_name, p.model_version, p.image_id, i.bucket, i.object_key, p.subset,
       p.predicted_label, p.confidence, p.top_k, p.true_label, p.scored_at
FROM predictions p
JOIN v_current_aliases a
    ON a.model_name = p.model_name AND a.model_version = p.model_version AND a.alias = 'champion'
JOIN images i ON i.id = p.image_id AND i.etag = p.etag
WHERE p.confidence < 0.6 AND i.deleted_at IS NULL AND i.status = 'ok'
ORDER BY p.confidence, p.image_id;

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
JOIN images i ON i.id = c.image_id AND i.etag = c.etag
WHERE ac.alias = 'champion' AND c.predicted_label <> h.predicted_label;

CREATE OR REPLACE VIEW v_inbox_latest_predictions AS
SELECT i.id AS image_id, i.bucket, i.prefix, i.object_key, i.first_seen_at,
       p.model_name, p.model_version, p.predicted_label, p.confidence, p.top_k, p.scored_at
FROM images i
LEFT JOIN predictions p ON p.id = (
    SELECT p2.id FROM predictions p2 WHERE p2.image_id = i.id AND p2.etag = i.etag
    ORDER BY p2.scored_at DESC, p2.model_version DESC, p2.id DESC LIMIT 1
)
WHERE i.subset = 'inbox' AND i.status = 'ok' AND i.deleted_at IS NULL;
