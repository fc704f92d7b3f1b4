-- The fingerprint of what a model trains on: the train and val members of a dataset version
-- (key, ETag, subset, label), as `dataset_version` is of all its labelled members. Two dataset
-- versions that differ only in test images train the same model: a run on the second has
-- nothing new to train. Written by scans; NULL for versions recorded before, which
-- `catalog.training_fingerprint` fills from their membership when first asked.

ALTER TABLE dataset_versions ADD COLUMN training_fingerprint VARCHAR(64) NULL AFTER label_map;
CREATE INDEX ix_dataset_versions_training ON dataset_versions (training_fingerprint);
