-- An alias move about to be made in MLflow: written (under the model's alias lock) before the
-- MLflow call and deleted with the move's `alias_history` row. A process killed between the two
-- leaves it behind, and the next `_reconcile` records the move with its own actor and reason
-- (a rollback stays a rollback) instead of an anonymous "reconciled with MLflow" row.

CREATE TABLE IF NOT EXISTS alias_intents (
    model_name VARCHAR(255) NOT NULL,
    alias VARCHAR(64) NOT NULL,
    from_version INT UNSIGNED NULL,
    to_version INT UNSIGNED NOT NULL,
    actor VARCHAR(255) NOT NULL,
    reason VARCHAR(512) NOT NULL,
    created_at DATETIME(6) NOT NULL,
    PRIMARY KEY (model_name, alias)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
