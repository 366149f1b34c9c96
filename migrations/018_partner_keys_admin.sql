-- 018_partner_keys_admin: administrators may end a partner's key, and
-- nothing else of it.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- Migration 016 let ketenhub_admin UPDATE every column of partner_keys,
-- so that a session holding it could give a key to another partner, or
-- change which key a trail's "key:..." actor was. A rotation (and the
-- trigger that follows partners.curve_public_key) only ever sets
-- expires_at.
REVOKE UPDATE ON partner_keys FROM ketenhub_admin;
GRANT UPDATE (expires_at) ON partner_keys TO ketenhub_admin;
