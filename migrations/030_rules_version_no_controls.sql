-- 030_rules_version_no_controls: the trail's rules_version, like its
-- other text, holds no control characters.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- Every text column of audit_events refuses control characters but
-- rules_version, which only had a length (migration 011): a role that may
-- write it (routing, intake, notification, the administrators' tools,
-- migration 024) could put a carriage return or a terminal escape in the
-- trail, which `ketenhubctl audit query` prints in its table as it is.
-- The events already in the trail are checked as the rule is added: one
-- that breaks it stops the migration, naming the constraint.
ALTER DOMAIN audit_rules_version
    DROP CONSTRAINT audit_events_rules_version_length;
ALTER DOMAIN audit_rules_version
    ADD CONSTRAINT audit_events_rules_version_format
    CHECK (char_length(VALUE) BETWEEN 1 AND 128 AND VALUE !~ '[[:cntrl:]]');
