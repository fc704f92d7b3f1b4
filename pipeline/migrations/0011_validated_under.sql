-- The validation limits (max_pixels, min_side, max_object_bytes) a row's verdict was made under:
-- `ScanConfig.limits_key`. A scan re-validates exactly the rows whose key is not its config's, so
-- a scan with new limits that dies half-way is finished by the next scan, whatever limits that
-- one uses, and a rerun of it GETs only what it had not validated yet. NULL (rows validated
-- before this column): the limits their prefix's stored scan configuration names.

ALTER TABLE images ADD COLUMN validated_under CHAR(16) NULL AFTER reject_detail;
