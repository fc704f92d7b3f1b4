-- One name for "the run that did this", as in MLflow tags and checkpoint paths: `run_key`, the
-- Airflow run id of a DAG run, or `cli__<UTC time>` for `python -m pipeline ...` (so a CLI run is
-- recorded as such). Was `airflow_run_id`, which CLI runs also filled.
ALTER TABLE predictions CHANGE COLUMN airflow_run_id run_key VARCHAR(255) NULL;
ALTER TABLE model_versions CHANGE COLUMN airflow_run_id run_key VARCHAR(255) NULL;
ALTER TABLE drift_embeddings CHANGE COLUMN airflow_run_id run_key VARCHAR(255) NOT NULL;
ALTER TABLE drift_reports CHANGE COLUMN airflow_run_id run_key VARCHAR(255) NOT NULL;

CREATE OR REPLACE VIEW v_prediction_lineage AS
SELECT
    p.id AS prediction_id,
    p.image_id,
    i.bucket,
    i.object_key,
    p.subset,
    p.predicted_label,
    p.confidence,
    p.true_label,
    p.scored_at,
    p.run_key AS scoring_run_key,
    p.dataset_version AS scored_dataset_version,
    p.model_name,
    p.model_version,
    p.mlflow_run_id,
    mv.run_key AS training_run_key,
    mv.dataset_version AS training_dataset_version,
    mv.created_at AS registered_at,
    mv.decision AS gate_decision,
    dv.created_at AS training_dataset_created_at,
    dv.n_images AS training_dataset_images,
    s.id AS training_scan_id,
    s.finished_at AS training_scan_finished_at
FROM predictions p
JOIN images i ON i.id = p.image_id
LEFT JOIN model_versions mv
    ON mv.model_name = p.model_name AND mv.model_version = p.model_version
LEFT JOIN dataset_versions dv ON dv.dataset_version = mv.dataset_version
LEFT JOIN scans s ON s.id = (
    SELECT MIN(s2.id) FROM scans s2 WHERE s2.dataset_version = mv.dataset_version
);

CREATE OR REPLACE VIEW v_drift_history AS
SELECT r.model_name, r.model_version, r.run_key, r.subset, r.checked_at, r.status,
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
