-- Tables of the referral service (beside the kernel's).

-- Persons known from identification (fed by the persons projection).
CREATE TABLE persons (
    person_id  UUID    PRIMARY KEY,
    case_id    UUID    NOT NULL UNIQUE,
    -- nrm.identification.v1.CaseStatus
    status     INTEGER NOT NULL,
    child      BOOLEAN NOT NULL,
    -- Version of the case stream last applied.
    version    BIGINT  NOT NULL
);

-- One row per consent, written with its events. Referrals lock the row
-- (FOR SHARE) while they commit; a withdrawal updates it first, so no
-- referral is created or redirected under a consent being withdrawn.
CREATE TABLE consents (
    consent_id       UUID    PRIMARY KEY,
    person_id        UUID    NOT NULL,
    recipient_agency TEXT    NOT NULL,
    withdrawn        BOOLEAN NOT NULL
);

-- Open referrals (pending, redirected, accepted) and the consent each rests
-- on, written with the referral's events: a withdrawal cancels these.
CREATE TABLE open_referrals (
    referral_id UUID PRIMARY KEY,
    consent_id  UUID NOT NULL REFERENCES consents (consent_id)
);
CREATE INDEX open_referrals_by_consent ON open_referrals (consent_id);

-- Read model of the inbox (coded fields only), fed by the inbox projection.
CREATE TABLE inbox (
    referral_id      UUID        PRIMARY KEY,
    receiving_agency TEXT        NOT NULL,
    -- nrm.referral.v1.ReferralStatus
    status           INTEGER     NOT NULL,
    -- nrm.referral.v1.Urgency
    urgency          INTEGER     NOT NULL,
    overdue          BOOLEAN     NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    version          BIGINT      NOT NULL,
    -- The encoded nrm.referral.v1.Referral.
    view             BYTEA       NOT NULL
);
CREATE INDEX inbox_by_agency ON inbox (receiving_agency, created_at DESC, referral_id DESC);
CREATE INDEX inbox_overdue ON inbox (created_at DESC, referral_id DESC) WHERE overdue;
