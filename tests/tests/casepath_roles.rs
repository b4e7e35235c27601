//! Issue 11: the same path asked by every role, in and out of scope. What
//! each caller should see is not written down here a second time: it is
//! derived from the kernel's matrix rows `CasepathService/GetPath (<part>)`
//! (`nrm_kernel::permissions::permit`) and the standing of the caller's
//! agency to each record, as the contract defines it (case holders, the
//! referral's sender and addressee, the shelter's operator and the bed's
//! holder, the return's holders or its arrival at home, the consent behind
//! an accepted referral). The records and their agencies are read off the
//! coordinator's view, which sees everything. So the table and the test
//! cannot drift: change a row and the expectation changes with it.
//!
//! For every caller: the parts, the person (coded) or none, the steps
//! (kind and record, in order), each step's detail of its own part, the
//! stage only with the identification part (or for the coordinator), the
//! time per stage only for the coordinator; a caller that sees nothing is
//! refused with PERMISSION_DENIED, and roles without a GetPath row
//! (auditor, operator) always are.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::collections::HashMap;

use nrm_e2e::casepath::{CONSULATE, Caller, Countries, Country, SHELTER_OPERATOR, Walk, Walked};
use nrm_kernel::auth::Role;
use nrm_kernel::permissions::{self, CASEPATH, PATH_PARTS, Standing};
use nrm_proto::casepath::v1::{self as cp, PathPart, step::Detail};
use nrm_proto::repatriation::v1::Direction;

/// The matrix's name of a part.
fn part_name(part: i32) -> &'static str {
    match PathPart::try_from(part).unwrap() {
        PathPart::Person => "person",
        PathPart::Identification => "identification",
        PathPart::Consents => "consents",
        PathPart::Referrals => "referrals",
        PathPart::Shelter => "shelter",
        PathPart::Return => "return",
        PathPart::Plan => "plan",
        PathPart::Unspecified => panic!("a step of no part"),
    }
}

fn part_of(name: &str) -> PathPart {
    PathPart::try_from(i32::try_from(PATH_PARTS.iter().position(|p| *p == name).unwrap() + 1).unwrap()).unwrap()
}

/// What the test knows of the person's records in one country.
#[derive(Clone)]
struct Facts {
    /// Reporting agency and competent authority of the person's case.
    case_holders: Vec<String>,
    competent_authority: String,
    /// Agencies with an accepted referral under an active consent.
    consented: Vec<String>,
    /// Who opened the return (ru's IOM office).
    opened_by: String,
    /// Each referral's referring agency and its addressee now (its last
    /// redirection's), as its steps tell them: a step such as an acceptance
    /// carries only what changed, the referral's parties are the
    /// referral's.
    referrals: HashMap<String, (String, String)>,
    /// Each bed hold's holder, as its steps tell it (an admission carries
    /// only what changed).
    holders: HashMap<String, String>,
}

/// The holder of each bed hold in `full`.
fn hold_holders(full: &cp::Path) -> HashMap<String, String> {
    let mut holders: HashMap<String, String> = HashMap::new();
    for step in &full.steps {
        if let Some(Detail::Shelter(h)) = &step.detail {
            let entry = holders.entry(h.hold_id.clone()).or_default();
            if !h.holder_agency.is_empty() {
                entry.clone_from(&h.holder_agency);
            }
        }
    }
    holders
}

/// The parties of each referral in `full`.
fn referral_parties(full: &cp::Path) -> HashMap<String, (String, String)> {
    let mut parties: HashMap<String, (String, String)> = HashMap::new();
    for step in &full.steps {
        if let Some(Detail::Referral(r)) = &step.detail {
            let entry = parties.entry(r.referral_id.clone()).or_default();
            if !r.referring_agency.is_empty() {
                entry.0.clone_from(&r.referring_agency);
            }
            if !r.receiving_agency.is_empty() {
                entry.1.clone_from(&r.receiving_agency);
            }
        }
    }
    parties
}

/// The standing of `agency` to the record of `step` (or, for `None`, to the person).
fn standing<'a>(facts: &'a Facts, step: Option<&'a cp::Step>, agency: &str) -> Standing<'a> {
    let consented = facts.consented.iter().any(|a| a == agency);
    let holders = || Standing {
        case_holders: facts.case_holders.iter().map(String::as_str).collect(),
        competent_authority: Some(facts.competent_authority.as_str()),
        consented,
        ..Standing::default()
    };
    let Some(step) = step else {
        return holders();
    };
    match step.detail.as_ref() {
        Some(Detail::Identification(_) | Detail::Consent(_)) => Standing {
            consented: false,
            ..holders()
        },
        Some(Detail::Referral(r)) => {
            let (owner, addressee) = &facts.referrals[&r.referral_id];
            Standing {
                owner: Some(owner.as_str()),
                addressees: vec![addressee.as_str()],
                ..Standing::default()
            }
        }
        Some(Detail::Shelter(h)) => Standing {
            shelter_operator: Some(SHELTER_OPERATOR),
            addressees: vec![facts.holders[&h.hold_id].as_str()],
            ..Standing::default()
        },
        Some(Detail::Return(r)) => Standing {
            case_holders: vec![facts.opened_by.as_str(), CONSULATE],
            consented: r.direction == Direction::Incoming as i32,
            ..Standing::default()
        },
        Some(Detail::Plan(_)) => Standing {
            consented,
            ..Standing::default()
        },
        None => panic!("the coordinator's step has no detail: {step:?}"),
    }
}

/// Whether `caller` may see the record (`None`: the person) of `part`.
fn admits(facts: &Facts, caller: &Caller, part: &str, step: Option<&cp::Step>) -> bool {
    permissions::permit(CASEPATH, "GetPath", Some(part), caller.role)
        .is_ok_and(|permit| permit.admits(&caller.agency, &standing(facts, step, &caller.agency)))
}

/// The detail's part.
fn detail_part(detail: Option<&Detail>) -> PathPart {
    match detail {
        Some(Detail::Identification(_)) => PathPart::Identification,
        Some(Detail::Consent(_)) => PathPart::Consents,
        Some(Detail::Referral(_)) => PathPart::Referrals,
        Some(Detail::Shelter(_)) => PathPart::Shelter,
        Some(Detail::Return(_)) => PathPart::Return,
        Some(Detail::Plan(_)) => PathPart::Plan,
        None => PathPart::Unspecified,
    }
}

/// Asks for the person's path as each of `callers` and checks it against
/// the coordinator's; the number of (caller, part) pairs checked.
async fn check_country(country: &Country, person_id: &str, facts: &Facts, callers: &[Caller]) -> usize {
    let full = country
        .casepath
        .path(person_id, &country.caller(Role::Coordinator))
        .await
        .unwrap();
    let facts = &Facts {
        referrals: referral_parties(&full),
        holders: hold_holders(&full),
        ..facts.clone()
    };
    for step in &full.steps {
        assert_eq!(
            detail_part(step.detail.as_ref()) as i32,
            step.part,
            "{}: the coordinator's step carries the detail of its part: {step:?}",
            country.code
        );
    }
    let mut pairs = 0;
    for caller in callers {
        let who = format!("{} {} as {}", country.code, caller.agency, caller.role.as_str());
        let person = admits(facts, caller, "person", None);
        let steps: Vec<&cp::Step> = full
            .steps
            .iter()
            .filter(|s| admits(facts, caller, part_name(s.part), Some(s)))
            .collect();
        let mut parts: Vec<i32> = PATH_PARTS
            .iter()
            .filter(|part| (**part == "person" && person) || steps.iter().any(|s| part_name(s.part) == **part))
            .map(|part| part_of(part) as i32)
            .collect();
        parts.sort_unstable();
        pairs += PATH_PARTS.len();

        let answer = country.casepath.path(person_id, caller).await;
        if parts.is_empty() {
            let status = answer.expect_err(&format!("{who}: sees nothing, is refused"));
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{who}: {status:?}");
            continue;
        }
        let path = answer.unwrap_or_else(|s| panic!("{who}: {s:?}"));
        assert_eq!(path.parts, parts, "{who}: the parts");
        assert_eq!(path.person.is_some(), person, "{who}: the coded person");
        if person {
            assert_eq!(path.person, full.person, "{who}: the same coded person");
        }
        let seen: Vec<(i32, &str)> = path.steps.iter().map(|s| (s.kind, s.subject_id.as_str())).collect();
        let expected: Vec<(i32, &str)> = steps.iter().map(|s| (s.kind, s.subject_id.as_str())).collect();
        assert_eq!(seen, expected, "{who}: the steps");
        for (step, full_step) in path.steps.iter().zip(&steps) {
            assert_eq!(
                detail_part(step.detail.as_ref()) as i32,
                step.part,
                "{who}: a step's detail is of its part: {step:?}"
            );
            assert_eq!(step.detail, full_step.detail, "{who}: the detail of a step it may see");
            assert_eq!((step.at, &step.agency), (full_step.at, &full_step.agency), "{who}");
        }
        let with_stage = caller.role == Role::Coordinator || parts.contains(&(PathPart::Identification as i32));
        assert_eq!(path.stage != 0, with_stage, "{who}: the stage: {:?}", path.stage);
        assert_eq!(
            !path.stages.is_empty(),
            caller.role == Role::Coordinator,
            "{who}: the time per stage is the coordinator's"
        );
        for item in &path.waiting {
            assert!(
                parts.contains(
                    &(if item.kind == cp::InboxKind::ReferralAnswer as i32 {
                        PathPart::Referrals
                    } else {
                        PathPart::Identification
                    } as i32)
                ),
                "{who}: waits only in the parts shown: {item:?}"
            );
        }
        println!(
            "{who}: parts {:?}, {} of {} steps",
            path.parts,
            path.steps.len(),
            full.steps.len()
        );
    }
    pairs
}

/// Every role: the walk's agency of that role and one of the same role elsewhere.
fn callers(country: &Country) -> Vec<Caller> {
    let mut callers = Vec::new();
    for role in Role::ALL {
        let home = country.caller(role);
        callers.push(Caller::new(&format!("{}-elsewhere", home.agency), role));
        callers.push(home);
    }
    callers
}

fn facts_kg(walked: &Walked, full: &cp::Path) -> Facts {
    let identification = full
        .steps
        .iter()
        .find_map(|s| match &s.detail {
            Some(Detail::Identification(d)) => Some(d.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(identification.case_id, walked.kg_case.case_id);
    Facts {
        case_holders: vec![
            identification.reporting_agency.clone(),
            identification.competent_authority.clone(),
        ],
        competent_authority: identification.competent_authority,
        consented: vec!["kg-msd".into()],
        opened_by: "ru-iom".into(),
        referrals: HashMap::new(),
        holders: HashMap::new(),
    }
}

#[tokio::test]
async fn each_role_sees_exactly_the_parts_and_records_the_matrix_gives_it() {
    let world = Countries::start().await;
    let walked = Walk::run(&world).await;

    let kg_full = world
        .kg
        .casepath
        .path(&walked.kg_case.person_id, &world.kg.caller(Role::Coordinator))
        .await
        .unwrap();
    let kg_facts = facts_kg(&walked, &kg_full);
    let mut pairs = check_country(&world.kg, &walked.kg_case.person_id, &kg_facts, &callers(&world.kg)).await;

    let ru_facts = Facts {
        case_holders: vec!["ru-mvd".into()],
        competent_authority: "ru-mvd".into(),
        consented: vec![],
        opened_by: "ru-iom".into(),
        referrals: HashMap::new(),
        holders: HashMap::new(),
    };
    pairs += check_country(&world.ru, &walked.ru_case.person_id, &ru_facts, &callers(&world.ru)).await;
    println!("(role, part) pairs tried: {pairs}");
    assert_eq!(pairs, 2 * 2 * Role::ALL.len() * PATH_PARTS.len());

    world.stop().await;
}
