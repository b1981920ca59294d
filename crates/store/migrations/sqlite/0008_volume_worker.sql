-- The worker whose host keeps a volume's image, for volumes made in
-- multi-worker mode on a remote worker. Null: the control plane's own host
-- (its in-process worker), where every volume made before lives.
ALTER TABLE volumes ADD COLUMN worker_id TEXT;
