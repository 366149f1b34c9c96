-- 016_partner_keys: a partner's CURVE key can be replaced under the same
-- partner id, with a time in which the old key still works.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- A partner was one row with one key: replacing a key meant revoking the
-- partner and adding it again under a new id, which the rules then had to
-- name, while the deliveries waiting for the old id became dead letters.
-- partner_keys holds every key a partner has had. partners.curve_public_key
-- stays the current key; a trigger adds each new one here, so that every
-- way of setting it (registration, rotation) records it. A key is never
-- given to another partner, even long after it expired: the primary key
-- spans every key ever registered.
CREATE TABLE partner_keys (
    curve_public_key text PRIMARY KEY
        CONSTRAINT partner_keys_curve_public_key_z85
        CHECK (curve_public_key ~ '^[]0-9a-zA-Z.:+=^!/*?&<>()[{}@%$#-]{40}$'
               AND curve_public_key <> repeat('0', 40)),
    partner_id text NOT NULL
        CONSTRAINT partner_keys_partner_id_fkey REFERENCES partners (id),
    added_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NULL,
    CONSTRAINT partner_keys_expires_after_added
        CHECK (expires_at IS NULL OR expires_at >= added_at)
);
CREATE UNIQUE INDEX partner_keys_one_current ON partner_keys (partner_id)
    WHERE expires_at IS NULL;

COMMENT ON TABLE partner_keys IS
    'Every CURVE public key a partner has had. A key admits its partner '
    'while the partner is not revoked and the key has not expired.';
COMMENT ON COLUMN partner_keys.expires_at IS
    'NULL: the partner''s current key (partners.curve_public_key). Else '
    'the moment it stopped, or stops, admitting the partner: a rotation '
    'gives the key it replaces the overlap the administrator chose.';
COMMENT ON TABLE partners IS
    'Partner systems that may connect to the hub, one row per partner; its '
    'keys are in partner_keys. Rows are never deleted: a revoked partner '
    'keeps its row so the trail can still name it.';
COMMENT ON COLUMN partners.curve_public_key IS
    'The partner''s current CURVE public key (Z85). Earlier keys, and how '
    'long each still admits the partner, are in partner_keys.';

INSERT INTO partner_keys (curve_public_key, partner_id, added_at)
    SELECT curve_public_key, id, created_at FROM partners;

-- A new current key: the one before it ends now, unless the rotation that
-- replaces it gave it an end already (its overlap).
CREATE FUNCTION partner_keys_follow() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.curve_public_key = OLD.curve_public_key THEN
            RETURN NEW;
        END IF;
        UPDATE partner_keys SET expires_at = now()
            WHERE partner_id = OLD.id AND expires_at IS NULL;
    END IF;
    INSERT INTO partner_keys (curve_public_key, partner_id)
        VALUES (NEW.curve_public_key, NEW.id);
    RETURN NEW;
END
$$;
CREATE TRIGGER partners_keys_follow
    AFTER INSERT OR UPDATE OF curve_public_key ON partners
    FOR EACH ROW EXECUTE FUNCTION partner_keys_follow();

REVOKE ALL ON partner_keys FROM PUBLIC;
GRANT SELECT ON partner_keys TO ketenhub_intake, ketenhub_routing,
    ketenhub_notification;
GRANT SELECT, INSERT, UPDATE ON partner_keys TO ketenhub_admin;

-- The trail records a rotation as partner.key_rotated.
ALTER DOMAIN audit_action DROP CONSTRAINT audit_events_action_known;
ALTER DOMAIN audit_action ADD CONSTRAINT audit_events_action_known
    CHECK (VALUE IN ('referral.accepted', 'referral.rejected',
                     'referral.routed', 'referral.purged',
                     'request.rejected',
                     'delivery.created', 'delivery.sent',
                     'delivery.acked', 'delivery.nacked',
                     'delivery.dead', 'delivery.escalated',
                     'delivery.retried', 'rules.reloaded',
                     'rules.reload_failed', 'auth.refused',
                     'partner.added', 'partner.revoked',
                     'partner.key_rotated',
                     'trail.queried', 'trail.exported',
                     'trail.verified'));
