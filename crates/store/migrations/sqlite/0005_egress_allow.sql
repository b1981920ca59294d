-- A sandbox's egress allow list (JSON array of CIDR networks and host
-- names; empty: no policy), kept so an adopted sandbox keeps its policy.
ALTER TABLE sandboxes ADD COLUMN egress_allow TEXT NOT NULL DEFAULT '[]';
