-- The rolling inbox window a check judged: after `window_since` (the version's last inbox verdict
-- by another run when this run first checked) up to `window_until` (that first check). A rerun of
-- the run's check (a retry, a cleared task) judges the same window, whatever other runs checked
-- since; `checked_at` still says when the verdict was last computed. NULL: not a rolling window.

ALTER TABLE drift_reports ADD COLUMN window_since DATETIME(6) NULL AFTER checked_at;
ALTER TABLE drift_reports ADD COLUMN window_until DATETIME(6) NULL AFTER window_since;
