-- 023_audit_partner_keys: auditors see which partner each CURVE key was,
-- and when it admitted that partner.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- The trail names a partner by its id, but a refused handshake, which has
-- no partner, by its key ("key:" and the Z85 public key, auth.refused),
-- and partner.key_rotated names neither the new key nor how long the old
-- one still admitted the partner. Auditors read views only, and no view
-- held the keys: to tell whose a refused key was, or whether a key was
-- still in its overlap when it was used, an auditor had to ask an
-- administrator. audit_partner_keys gives every key a partner has had
-- (public keys: no personal data), with when it was added, when it
-- stopped admitting the partner (NULL: its current key) and when the
-- partner was revoked (its keys end then too).
CREATE VIEW audit_partner_keys AS
    SELECT k.partner_id, k.curve_public_key, k.added_at, k.expires_at,
           p.revoked_at
    FROM partner_keys k JOIN partners p ON p.id = k.partner_id;

ALTER VIEW audit_partner_keys OWNER TO ketenhub_owner;
GRANT SELECT (curve_public_key, partner_id, added_at, expires_at)
    ON partner_keys TO ketenhub_owner;
GRANT SELECT (id, revoked_at) ON partners TO ketenhub_owner;
GRANT SELECT ON audit_partner_keys TO ketenhub_auditor, ketenhub_admin;

COMMENT ON VIEW audit_partner_keys IS
    'Every CURVE public key (Z85) each partner has had: added_at, '
    'expires_at (NULL: the current key) and the partner''s revoked_at, after '
    'which no key of it admits it. The trail''s actor "key:KEY" is '
    'curve_public_key KEY.';
