-- Issue 9: who holds a case, who recorded a consent, when it expires, and
-- which open referrals were accepted (for the "consented" scope of plans).

-- The agencies holding a person's case: the reporter and the competent
-- authority. Rows written before these columns get them when the
-- projection reads the identification stream again from its beginning
-- (its checkpoint and version guard go; the rows stay, so known persons
-- stay known meanwhile, and a report read again fills in the agencies).
ALTER TABLE persons
    ADD COLUMN reporting_agency    TEXT NOT NULL DEFAULT '',
    ADD COLUMN competent_authority TEXT NOT NULL DEFAULT '';
DELETE FROM projection_checkpoints WHERE projection = 'referral_persons';
DELETE FROM projection_versions WHERE projection = 'referral_persons';

-- The agency that recorded the consent (it may withdraw it) and when it
-- expires (its expiry timer ends it then; a consent recorded before this
-- column has its expiry on its event only).
ALTER TABLE consents
    ADD COLUMN recording_agency TEXT NOT NULL DEFAULT '',
    ADD COLUMN expires_at       TIMESTAMPTZ;
CREATE INDEX consents_by_person ON consents (person_id);

-- An open referral the receiver accepted (written with the referral's events).
ALTER TABLE open_referrals ADD COLUMN accepted BOOLEAN NOT NULL DEFAULT false;
-- nrm.referral.v1.ReferralStatus ACCEPTED = 2, as the inbox knew it.
UPDATE open_referrals o SET accepted = true FROM inbox i WHERE i.referral_id = o.referral_id AND i.status = 2;
