-- What other agencies may read, learnt from the referral service's events:
-- consents (who may see which categories of identifiers, until when) and the
-- referrals they accepted. Decryption stays here; the keys never leave.
CREATE TABLE consents (
    consent_id       UUID        PRIMARY KEY,
    person_id        UUID        NOT NULL,
    recipient_agency TEXT        NOT NULL,
    data_categories  INTEGER[]   NOT NULL,
    expires_at       TIMESTAMPTZ,
    withdrawn        BOOLEAN     NOT NULL DEFAULT false
);

CREATE TABLE referrals (
    referral_id      UUID    PRIMARY KEY,
    person_id        UUID    NOT NULL,
    receiving_agency TEXT    NOT NULL,
    consent_id       UUID    NOT NULL,
    -- pending, accepted, or ended (declined, closed, cancelled)
    state            TEXT    NOT NULL
);
CREATE INDEX referrals_by_person ON referrals (person_id, receiving_agency);

-- Which case a person was reported in (the person's identifiers are on it).
CREATE TABLE persons (
    person_id UUID PRIMARY KEY,
    case_id   UUID NOT NULL
);
