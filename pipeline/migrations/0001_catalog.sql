-- Catalog: one row per object under <prefix>/<split>/<label>/<file> (or <prefix>/inbox/<file>),
-- the scans that wrote them, and the dataset versions (with their exact membership) they produced.
-- Object keys can be 1024 bytes, too long for a unique index, so (bucket, key_hash = sha256(key))
-- is the natural key. Every statement is safe to re-run (MySQL DDL is not transactional).

CREATE TABLE IF NOT EXISTS images (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    bucket VARCHAR(63) NOT NULL,
    prefix VARCHAR(512) NOT NULL,
    object_key VARCHAR(1024) NOT NULL,
    key_hash CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    split VARCHAR(16) NOT NULL,
    subset VARCHAR(16) NOT NULL,
    label VARCHAR(255) NULL,
    size_bytes BIGINT NOT NULL,
    etag VARCHAR(128) NOT NULL,
    content_sha256 CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    width INT NULL,
    height INT NULL,
    format VARCHAR(16) NULL,
    mode VARCHAR(16) NULL,
    status VARCHAR(16) NOT NULL,
    reject_reason VARCHAR(255) NULL,
    first_seen_at DATETIME(6) NOT NULL,
    last_seen_at DATETIME(6) NOT NULL,
    deleted_at DATETIME(6) NULL,
    updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_images_bucket_key (bucket, key_hash),
    KEY ix_images_scope (bucket, prefix(190), deleted_at),
    KEY ix_images_content (content_sha256),
    KEY ix_images_subset (subset, status)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS dataset_versions (
    dataset_version VARCHAR(64) NOT NULL PRIMARY KEY,
    bucket VARCHAR(63) NOT NULL,
    prefix VARCHAR(512) NOT NULL,
    n_images INT NOT NULL,
    counts JSON NOT NULL,
    label_map JSON NOT NULL,
    created_at DATETIME(6) NOT NULL,
    KEY ix_dataset_versions_scope (bucket, prefix(190), created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS dataset_version_images (
    dataset_version VARCHAR(64) NOT NULL,
    image_id BIGINT UNSIGNED NOT NULL,
    subset VARCHAR(16) NOT NULL,
    label VARCHAR(255) NOT NULL,
    etag VARCHAR(128) NOT NULL,
    PRIMARY KEY (dataset_version, image_id),
    KEY ix_dataset_version_images_image (image_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS scans (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    bucket VARCHAR(63) NOT NULL,
    prefix VARCHAR(512) NOT NULL,
    started_at DATETIME(6) NOT NULL,
    finished_at DATETIME(6) NOT NULL,
    dataset_version VARCHAR(64) NOT NULL,
    listed INT NOT NULL,
    new_objects INT NOT NULL,
    changed_objects INT NOT NULL,
    deleted_objects INT NOT NULL,
    ok INT NOT NULL,
    rejected INT NOT NULL,
    ignored INT NOT NULL,
    gets INT NOT NULL,
    summary JSON NOT NULL,
    KEY ix_scans_scope (bucket, prefix(190), id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
