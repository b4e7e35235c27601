//! Protobuf enums on the command line: `--form forced-begging` is
//! `EXPLOITATION_FORM_FORCED_BEGGING`. One generic mapping for every enum,
//! built on the prost-generated `from_str_name`/`as_str_name`; the type's
//! prefix is read off its `…_UNSPECIFIED` value, which is never accepted.

use std::ffi::OsStr;
use std::marker::PhantomData;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::error::ErrorKind;
use nrm_proto::common::v1::{AgeBand, ChainBreak, DocumentType, Gender, ParkedKind};
use nrm_proto::identification::v1::{
    CaseStatus, Decision, ErasureReason, ExploitationForm, Indicator, MeansOfControl, NotIdentifiedReason, ReadPurpose,
    RecruiterRelationship, RecruitmentMethod, ReviewReason,
};
use nrm_proto::referral::v1::{
    ConsentGiver, DataCategory, DeclineReason, GoalKind, ReferralOutcome, ReferralStatus, ServiceKind, Urgency,
};
use nrm_proto::repatriation::v1::{
    ArrivalNeed, ArrivalPointKind, Direction, FamilyInvolvement, HaltReason, ReturnStatus, SharedField,
};
use nrm_proto::shelter::v1::{BedCategory, OnSiteService};

/// A prost-generated enum whose value names share a prefix ending in `_`
/// and whose zero value is `{PREFIX}UNSPECIFIED`.
pub trait ProtoEnum: Copy + Send + Sync + 'static + TryFrom<i32> + Into<i32> {
    /// The value called `name` in the `.proto` file (`EXPLOITATION_FORM_LABOUR`).
    fn from_proto_name(name: &str) -> Option<Self>;
    /// The value's name in the `.proto` file.
    fn proto_name(self) -> &'static str;
}

/// Implements [`ProtoEnum`] by delegating to the generated inherent methods.
macro_rules! proto_enums {
    ($($ty:ty),* $(,)?) => {$(
        impl ProtoEnum for $ty {
            fn from_proto_name(name: &str) -> Option<Self> {
                <$ty>::from_str_name(name)
            }
            fn proto_name(self) -> &'static str {
                self.as_str_name()
            }
        }
    )*};
}

proto_enums!(
    // common
    AgeBand,
    DocumentType,
    Gender,
    ParkedKind,
    ChainBreak,
    // identification
    CaseStatus,
    Decision,
    ErasureReason,
    ExploitationForm,
    Indicator,
    MeansOfControl,
    NotIdentifiedReason,
    ReadPurpose,
    RecruiterRelationship,
    RecruitmentMethod,
    ReviewReason,
    // referral
    ConsentGiver,
    DataCategory,
    DeclineReason,
    GoalKind,
    ReferralOutcome,
    ReferralStatus,
    ServiceKind,
    Urgency,
    // shelter
    BedCategory,
    OnSiteService,
    // repatriation
    ArrivalNeed,
    ArrivalPointKind,
    Direction,
    FamilyInvolvement,
    HaltReason,
    ReturnStatus,
    SharedField,
);

/// The prefix shared by every value name of `E` (`EXPLOITATION_FORM_`).
fn prefix<E: ProtoEnum>() -> &'static str {
    E::try_from(0)
        .ok()
        .and_then(|zero| zero.proto_name().strip_suffix("UNSPECIFIED"))
        .unwrap_or("")
}

/// The command-line name of `value`: the name without the prefix, in
/// kebab-case (`forced-begging`).
pub fn cli_name<E: ProtoEnum>(value: E) -> String {
    let name = value.proto_name();
    name.strip_prefix(prefix::<E>())
        .unwrap_or(name)
        .to_ascii_lowercase()
        .replace('_', "-")
}

/// For text output: the command-line name, or `-` for the unspecified value.
pub fn shown<E: ProtoEnum>(value: E) -> String {
    if value.into() == 0 {
        "-".to_owned()
    } else {
        cli_name(value)
    }
}

/// The command-line name of a raw enum number as found in a message; the
/// number itself when `E` has no such value.
pub fn cli_name_of<E: ProtoEnum>(raw: i32) -> String {
    E::try_from(raw).map_or_else(|_| raw.to_string(), cli_name)
}

/// Every command-line name of `E` except the unspecified value, in number order.
pub fn cli_names<E: ProtoEnum>() -> Vec<String> {
    (1..=i32::from(u8::MAX))
        .filter_map(|n| E::try_from(n).ok())
        .map(cli_name)
        .collect()
}

/// The value of `E` named `name`: the name without the prefix, in any case,
/// with `-` or `_` between words.
///
/// # Errors
/// A message listing the valid names when `name` names no value.
pub fn parse<E: ProtoEnum>(name: &str) -> Result<E, String> {
    let suffix = name.trim().to_ascii_uppercase().replace('-', "_");
    if !suffix.is_empty()
        && suffix != "UNSPECIFIED"
        && let Some(value) = E::from_proto_name(&format!("{}{suffix}", prefix::<E>()))
    {
        return Ok(value);
    }
    Err(format!(
        "unknown value '{name}'; one of: {}",
        cli_names::<E>().join(", ")
    ))
}

/// A clap value parser for any [`ProtoEnum`], listing the names in `--help`.
pub struct EnumParser<E>(PhantomData<fn() -> E>);

impl<E> EnumParser<E> {
    /// A parser for `E`.
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<E> Clone for EnumParser<E> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<E: ProtoEnum> TypedValueParser for EnumParser<E> {
    type Value = E;

    fn parse_ref(&self, cmd: &clap::Command, arg: Option<&clap::Arg>, value: &OsStr) -> Result<E, clap::Error> {
        let text = value
            .to_str()
            .ok_or_else(|| clap::Error::new(ErrorKind::InvalidUtf8).with_cmd(cmd))?;
        parse::<E>(text).map_err(|message| {
            let arg = arg.map_or_else(|| "value".to_owned(), ToString::to_string);
            clap::Error::raw(
                ErrorKind::InvalidValue,
                format!("invalid value for '{arg}': {message}\n"),
            )
            .with_cmd(cmd)
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(cli_names::<E>().into_iter().map(PossibleValue::new)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kebab_and_snake_names_map_to_the_prefixed_value() {
        assert_eq!(parse::<ExploitationForm>("labour"), Ok(ExploitationForm::Labour));
        assert_eq!(
            parse::<ExploitationForm>("forced-begging"),
            Ok(ExploitationForm::ForcedBegging)
        );
        assert_eq!(
            parse::<ExploitationForm>("forced_begging"),
            Ok(ExploitationForm::ForcedBegging)
        );
        assert_eq!(
            parse::<ExploitationForm>("Sale-Of-Child"),
            Ok(ExploitationForm::SaleOfChild)
        );
        assert_eq!(
            parse::<Indicator>("deception-about-work"),
            Ok(Indicator::DeceptionAboutWork)
        );
        assert_eq!(parse::<Decision>("not-identified"), Ok(Decision::NotIdentified));
        assert_eq!(parse::<AgeBand>("18-24"), Ok(AgeBand::AgeBand1824));
        assert_eq!(parse::<AgeBand>("50-plus"), Ok(AgeBand::AgeBand50Plus));
        assert_eq!(parse::<DocumentType>("national-id"), Ok(DocumentType::NationalId));
        assert_eq!(
            parse::<ErasureReason>("data-subject-request"),
            Ok(ErasureReason::DataSubjectRequest)
        );
        assert_eq!(parse::<ReadPurpose>("case-review"), Ok(ReadPurpose::CaseReview));
        assert_eq!(
            cli_names::<ReadPurpose>(),
            [
                "victim-protection",
                "criminal-proceedings",
                "case-review",
                "data-subject-request",
                "oversight"
            ]
        );
    }

    #[test]
    fn referral_and_shelter_enums_read_their_kebab_names() {
        assert_eq!(
            parse::<ConsentGiver>("best-interests-decision"),
            Ok(ConsentGiver::BestInterestsDecision)
        );
        assert_eq!(parse::<ServiceKind>("family-tracing"), Ok(ServiceKind::FamilyTracing));
        assert_eq!(parse::<DataCategory>("date-of-birth"), Ok(DataCategory::DateOfBirth));
        assert_eq!(parse::<Urgency>("urgent"), Ok(Urgency::Urgent));
        assert_eq!(parse::<ReferralStatus>("pending"), Ok(ReferralStatus::Pending));
        assert_eq!(parse::<DeclineReason>("no-capacity"), Ok(DeclineReason::NoCapacity));
        assert_eq!(
            parse::<ReferralOutcome>("services-completed"),
            Ok(ReferralOutcome::ServicesCompleted)
        );
        assert_eq!(parse::<GoalKind>("legal-status"), Ok(GoalKind::LegalStatus));
        assert_eq!(
            parse::<BedCategory>("mothers-with-children"),
            Ok(BedCategory::MothersWithChildren)
        );
        assert_eq!(parse::<OnSiteService>("child-care"), Ok(OnSiteService::ChildCare));
        assert_eq!(cli_names::<ParkedKind>(), ["message", "timer"]);
        assert_eq!(
            cli_names::<Urgency>(),
            ["urgent", "normal"],
            "the unspecified value is never offered"
        );
    }

    #[test]
    fn unknown_or_unspecified_names_are_refused_with_the_valid_names() {
        let err = parse::<Gender>("robot").expect_err("unknown name");
        assert_eq!(err, "unknown value 'robot'; one of: female, male, other, unknown");
        assert!(parse::<Gender>("unspecified").is_err());
        assert!(parse::<Gender>("").is_err());
        assert!(
            parse::<Gender>("GENDER_FEMALE").is_err(),
            "the prefix is not part of the name"
        );
    }

    #[test]
    fn names_round_trip_and_skip_the_unspecified_value() {
        let names = cli_names::<ExploitationForm>();
        assert_eq!(names.len(), 8);
        assert_eq!(names[2], "forced-begging");
        for name in names {
            let value = parse::<ExploitationForm>(&name).expect("listed names parse");
            assert_eq!(cli_name(value), name);
        }
        assert_eq!(
            cli_name_of::<CaseStatus>(CaseStatus::NotIdentified as i32),
            "not-identified"
        );
        assert_eq!(cli_name_of::<CaseStatus>(99), "99");
        assert_eq!(shown(Gender::Unspecified), "-");
        assert_eq!(shown(Gender::Female), "female");
    }
}
