-- Lineage in SQL: from a prediction to the model version, its MLflow run, the Airflow runs that
-- trained it and scored with it, the dataset version it was trained on and the scan that first
-- produced that dataset version. `model_versions` has a row from registration on (registry.
-- record_version). Safe to re-run.

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
    p.airflow_run_id AS scoring_airflow_run_id,
    p.dataset_version AS scored_dataset_version,
    p.model_name,
    p.model_version,
    p.mlflow_run_id,
    mv.airflow_run_id AS training_airflow_run_id,
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
