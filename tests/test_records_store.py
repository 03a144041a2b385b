"""Route and persist together on SQLite and PostgreSQL: threads, cases, links, contacts,
tracking, deduplication and the attachment store, each email routed with the database's
history (``persist.history.SqlHistory``) and saved by ``persist.store.EmailStore``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from parse.extract import parse_raw
from persist.blobs import FilesystemBlobStore, sanitise_filename
from persist.database import create_engine_for, upgrade
from persist.directory_store import DirectoryError, DirectoryStore
from persist.history import SqlHistory
from persist.store import EmailStore
from route.router import Router
from route.worker import RouteStage
from shared.schemas import Codec
from shared.settings import (
    AttachmentSettings,
    ContactSettings,
    DirectorySettings,
    LimitSettings,
    MailboxSettings,
    PrincipalSettings,
    RuleActions,
    RuleConditions,
    RuleSettings,
    Settings,
)
from tests import documents
from tests.mailgen import crm_mail as mail

pytest_plugins = ["tests.db_fixtures"]

RULES = (
    RuleSettings(name="no auto-replies", when=RuleConditions(auto_reply=True),
                 then=RuleActions(suppress=True)),
    RuleSettings(name="support case", when=RuleConditions(queue="support"),
                 then=RuleActions(create_case=True, link_case=True, priority="normal")),
    RuleSettings(name="follow case", when=RuleConditions(thread="with-case"),
                 then=RuleActions(link_case=True)),
)


def config(ann_track: str = "all", create_contacts: bool = False) -> Settings:
    return Settings(
        mailboxes=(MailboxSettings(name="ann", kind="maildir", path="/a"),
                   MailboxSettings(name="support", kind="maildir", path="/s")),
        users=(PrincipalSettings(name="ann", address="ann@corp.example", mailbox="ann",
                                 track=ann_track),),
        queues=(PrincipalSettings(name="support", address="support@corp.example",
                                  mailbox="support"),),
        contacts=(ContactSettings(name="Carol", addresses=("carol@customer.example",)),),
        directory=DirectorySettings(create_unknown_contacts=create_contacts),
        attachments=AttachmentSettings(max_bytes=10_000),
        rules=RULES)


class Pipeline:
    """route (with the database's history) then persist, through the schemas' codec."""

    def __init__(self, engine: Engine, settings: Settings, blobs: Path | None = None) -> None:
        self.codec = Codec()
        self.stage = RouteStage(Router(settings, history=SqlHistory(engine)))
        self.store = EmailStore(engine, blobs=FilesystemBlobStore(blobs) if blobs else None,
                                create_unknown_contacts=
                                settings.directory.create_unknown_contacts)
        DirectoryStore(engine).sync_config(settings)

    def route(self, raw: bytes, mailbox: str) -> dict[str, Any]:
        [(envelope, email)] = parse_raw(raw, "direct", LimitSettings()).items()
        doc = {"trace_id": "t", "source": documents.source(mailbox), "envelope": envelope,
               "email": email}
        doc = self.codec.decode("parsed", self.codec.encode("parsed", doc))
        [out] = self.stage.handle(doc)
        return self.codec.decode("routed", self.codec.encode("routed", out.document))

    def save(self, *routed: dict[str, Any]) -> list[int]:
        return [r.email_id for r in self.store.save(list(routed))]

    def __call__(self, raw: bytes, mailbox: str = "support") -> int:
        return self.save(self.route(raw, mailbox))[0]


def email_row(store: EmailStore, email_id: int) -> dict[str, Any]:
    row = store.email(email_id)
    assert row is not None
    return row


def test_conversation_threads_into_one_case(db_engine: Engine) -> None:
    run = Pipeline(db_engine, config())
    store = run.store
    first = run(mail("m1@c"))
    reply = run(mail("m2@c", subject="RE: Order 17", reply_to="m1@c"))
    token = run(mail("m3@c", subject=f"RE: Order 17 [CRM:{reply:07d}]"))
    smart = run(mail("m4@c", subject="AW: order 17"))
    stranger = run(mail("m5@c", sender="zed@else.example", subject="Re: Order 17"))
    rows = {i: email_row(store, i) for i in (first, reply, token, smart, stranger)}
    assert [(rows[i]["correlation_method"], rows[i]["parent_email_id"], rows[i]["thread_id"])
            for i in (first, reply, token, smart)] == [
        ("none", None, first), ("in-reply-to", first, first), ("token", reply, first),
        ("smart", token, first)]
    assert rows[stranger]["correlation_method"] == "none"  # no shared participant
    [case] = store.cases_for(first)
    assert (case["title"], case["rule"], case["queue"], case["priority"], case["link"]) == (
        "Order 17", "support case", "support", "normal", "created")
    for email_id in (reply, token, smart):
        assert [(c["id"], c["link"]) for c in store.cases_for(email_id)] == [
            (case["id"], "thread")]
    assert store.cases_for(stranger)[0]["id"] != case["id"]  # a new thread, a new case
    assert {(link["target_kind"], link["method"]) for link in store.links_for(reply)} >= {
        ("email", "in-reply-to"), ("case", "thread"), ("contact", "from")}
    assert store.count_rows()["cases"] == 2
    # the same mail again changes nothing
    assert run(mail("m2@c", subject="RE: Order 17", reply_to="m1@c")) == reply
    assert store.count_rows()["cases"] == 2 and store.count_rows()["links"] == len(
        store.links_for(first) + store.links_for(reply) + store.links_for(token)
        + store.links_for(smart) + store.links_for(stranger))


def test_reply_routed_before_its_parent_is_committed_is_linked_by_persist(
        db_engine: Engine) -> None:
    run = Pipeline(db_engine, config(ann_track="replies"))
    parent = run.route(mail("p1@c", to="ann@corp.example"), "ann")
    child = run.route(mail("p2@c", subject="Re: Order 17", reply_to="p1@c",
                           to="ann@corp.example"), "ann")
    grandchild = run.route(mail("p3@c", subject="Re: Order 17", reply_to="p2@c",
                                to="ann@corp.example"), "ann")
    # route saw nothing: in "replies" mode neither reply looked tracked
    assert child["correlation"]["method"] == "none"
    assert child["deliveries"][0]["untracked_reason"] == "not-a-reply-to-tracked-mail"
    run.save(parent)  # ... committed after route had looked
    # the parent is untracked too (not a reply): the child stays untracked
    [child_id] = run.save(child)
    row = email_row(run.store, child_id)
    assert (row["correlation_method"], row["correlation"]["resolved_by"]) == (
        "in-reply-to", "persist")
    assert row["tracked"] is False
    [grandchild_id] = run.save(grandchild)
    row = email_row(run.store, grandchild_id)
    assert (row["correlation_method"], row["parent_email_id"]) == ("in-reply-to", child_id)
    assert row["thread_id"] == email_row(run.store, child_id)["thread_id"]


@pytest.mark.parametrize("order", ["oldest first", "newest first"])
def test_a_conversation_arriving_in_one_batch_is_threaded(db_engine: Engine,
                                                          order: str) -> None:
    run = Pipeline(db_engine, config())
    routed = [run.route(mail("b1@c"), "support"),
              run.route(mail("b2@c", subject="RE: Order 17", reply_to="b1@c"), "support"),
              run.route(mail("b3@c", subject="RE: Order 17", reply_to="b2@c"), "support")]
    batch = routed if order == "oldest first" else routed[::-1]

    ids = dict(zip((r["email"]["message_id"] for r in batch), run.save(*batch), strict=True))

    first, reply, second_reply = ids["b1@c"], ids["b2@c"], ids["b3@c"]
    assert email_row(run.store, first)["parent_email_id"] is None
    assert email_row(run.store, reply)["parent_email_id"] == first
    assert email_row(run.store, second_reply)["parent_email_id"] == reply
    assert ("email", reply, "in-reply-to") in {
        (link["target_kind"], link["target_id"], link["method"])
        for link in run.store.links_for(second_reply)}
    if order == "oldest first":
        assert {email_row(run.store, i)["thread_id"] for i in ids.values()} == {first}
    assert run.store.count_rows()["emails"] == 3


def test_replies_mode_is_promoted_when_persist_finds_a_tracked_parent(
        db_engine: Engine) -> None:
    run = Pipeline(db_engine, config(ann_track="replies"))
    parent = run.route(mail("q1@c", to="ann@corp.example"), "support")  # support tracks all
    reply = run.route(mail("q2@c", subject="Re: Order 17", reply_to="q1@c"), "ann")
    parent_id, reply_id = run.save(parent, reply)  # one batch, parent first
    [delivery] = run.store.deliveries_for(reply_id)
    assert (delivery["tracked"], delivery["untracked_reason"]) == (True, None)
    row = email_row(run.store, reply_id)
    assert (row["parent_email_id"], row["thread_id"], row["tracked"]) == (
        parent_id, parent_id, True)


def test_untracked_auto_reply_is_recorded_but_makes_no_records(db_engine: Engine) -> None:
    run = Pipeline(db_engine, config())
    email_id = run(mail("a1@c", subject="Automatic reply: Order 17",
                        headers={"Auto-Submitted": "auto-replied"}))
    row = email_row(run.store, email_id)
    [delivery] = run.store.deliveries_for(email_id)
    assert (row["tracked"], delivery["tracked"], delivery["untracked_reason"],
            delivery["rule"]) == (False, False, "suppressed-by-rule", "no auto-replies")
    assert run.store.queue_items_for(email_id) == [] and run.store.cases_for(email_id) == []


def test_unknown_senders_become_contacts_only_when_configured(db_engine: Engine) -> None:
    run = Pipeline(db_engine, config())
    kept = run(mail("u1@c", sender="New.Person+shop@Unknown.example"))
    [sender] = [p for p in run.store.resolved_parties_for(kept) if p["role"] == "from"]
    assert (sender["resolution"], sender["contact_id"]) == ("unresolved", None)
    run = Pipeline(db_engine, config(create_contacts=True))
    made = run(mail("u2@c", sender="New.Person+shop@Unknown.example"))
    [sender] = [p for p in run.store.resolved_parties_for(made) if p["role"] == "from"]
    assert sender["resolution"] == "contact"
    contacts = DirectoryStore(db_engine).contacts()
    assert [(c["addresses"], c["source"]) for c in contacts if c["source"] == "auto"] == [
        (["new.person+shop@unknown.example"], "auto")]
    assert ("contact", sender["contact_id"], "created-from-sender") in {
        (link["target_kind"], link["target_id"], link["method"])
        for link in run.store.links_for(made)}


def test_contacts_and_accounts_from_the_cli_resolve_parties(db_engine: Engine) -> None:
    directory = DirectoryStore(db_engine)
    directory.add_account("Acme", domains=["acme.example"])
    directory.add_contact("Dan", ["dan@acme.example"], account="Acme")
    run = Pipeline(db_engine, config())
    email_id = run(mail("c1@c", sender="dan+x@ACME.example", to="eve@acme.example"))
    parties = {p["address"]: p for p in run.store.resolved_parties_for(email_id)}
    # stored as the mail wrote it, resolved case-insensitively
    assert parties["dan+x@ACME.example"]["resolution"] == "contact"
    assert parties["dan+x@ACME.example"]["account_id"] is not None
    assert parties["eve@acme.example"]["resolution"] == "account"


def test_reused_message_id_with_other_content_is_a_second_email(db_engine: Engine) -> None:
    run = Pipeline(db_engine, config())
    first = run(mail("same@c", body="first text"))
    second = run(mail("same@c", body="another text entirely"))
    assert first != second
    row = email_row(run.store, second)
    assert row["dedup_key"].startswith("mid:same@c#fp:") and "message-id-reused" in row["notes"]
    assert run(mail("same@c", body="another text entirely")) == second
    assert run(mail("same@c", body="first text")) == first
    assert run.store.count_rows()["emails"] == 2


def test_attachments_stored_once_by_hash_with_refusals_recorded(db_engine: Engine,
                                                                tmp_path: Path) -> None:
    run = Pipeline(db_engine, config(), blobs=tmp_path / "blobs")
    pdf = b"%PDF-1.4 shared" * 10
    one = run(mail("f1@c", attachments=(("../../etc/re\u202eport.pdf", pdf),
                                        ("tool.exe", b"MZ"), ("big.bin", b"x" * 20_000))))
    two = run(mail("f2@c", attachments=(("copy.pdf", pdf),)))
    files = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].read_bytes() == pdf
    got = {a["filename"]: a["status"] for a in run.store.attachments_for(one)}
    assert got == {"report.pdf": "stored", "tool.exe": "blocked-extension",
                   "big.bin": "too-large"}
    notes = email_row(run.store, one)["notes"]
    assert "attachment-blocked:tool.exe" in notes
    assert any(n.startswith("attachment-too-large:big.bin") for n in notes)
    counts = run.store.count_rows()
    assert (counts["attachments"], counts["attachment_contents"]) == (4, 1)
    [sha] = {a["sha256"] for a in run.store.attachments_for(two)}
    assert run.store.attachment_content(sha) == pdf
    tables = run.store.tables
    with db_engine.connect() as connection:
        assert connection.execute(select(tables.attachment_contents.c.storage,
                                         tables.attachment_contents.c.content)).all() == [
            ("filesystem", None)]


def test_sanitise_filename() -> None:
    assert sanitise_filename("../../etc/passwd") == "passwd"
    assert sanitise_filename("a\x00b\u202etxt.exe") == "abtxt.exe"
    assert sanitise_filename("C:\\x\\..\\evil.bat") == "evil.bat"
    assert sanitise_filename("...") == "attachment"
    assert sanitise_filename("x" * 300 + ".pdf").endswith(".pdf")
    assert len(sanitise_filename("x" * 300 + ".pdf")) == 200


def test_directory_csv_import_config_sync_and_removal(db_engine: Engine) -> None:
    directory = DirectoryStore(db_engine)
    directory.sync_config(config())
    directory.sync_config(config())  # idempotent
    csv_text = ("kind,name,address,account,domain\n"
                "account,Acme,info@acme.example,,acme.example\n"
                "contact,Dan,dan@acme.example,Acme,\n"
                "contact,Dan,DAN@Acme.Example,Acme,\n"
                "contact,Fay,fay@fay.example,,\n")
    assert directory.import_csv(io.StringIO(csv_text)) == (1, 2)
    contacts = {c["name"]: c for c in directory.contacts()}
    assert contacts["Dan"]["addresses"] == ["dan@acme.example"]
    assert contacts["Dan"]["account"] == "Acme" and contacts["Carol"]["source"] == "config"
    [acme] = directory.accounts()
    assert (acme["addresses"], acme["domains"]) == (["info@acme.example"], ["acme.example"])
    with pytest.raises(DirectoryError, match="line 2"):
        directory.import_csv(io.StringIO("kind,name,address\ncontact,Bad,\"a@b\"@c\n"))
    with pytest.raises(DirectoryError, match="configuration"):
        directory.remove_contact("carol@customer.example")
    assert directory.remove_contact("fay@fay.example") == "Fay"
    directory.remove_account("Acme")
    assert {c["name"]: c["account"] for c in directory.contacts()}["Dan"] is None


def test_upgrade_from_0001_keeps_attachment_content_readable(tmp_path: Path) -> None:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        upgrade(engine, "0001")
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "INSERT INTO attachment_contents (sha256, size, content) VALUES ('ab', 2, x'4869')")
        upgrade(engine)
        store = EmailStore(engine)
        assert store.attachment_content("ab") == b"Hi"
        assert store.count_rows()["cases"] == 0
    finally:
        engine.dispose()


def test_upgrade_from_0001_on_postgresql(empty_postgres_database_url: str) -> None:
    engine = create_engine_for(empty_postgres_database_url)
    try:
        upgrade(engine, "0001")
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "INSERT INTO attachment_contents (sha256, size, content) "
                "VALUES ('ab', 2, '\\x4869'::bytea)")
        upgrade(engine)
        assert EmailStore(engine).attachment_content("ab") == b"Hi"
    finally:
        engine.dispose()


def test_old_routed_documents_without_records_still_store(db_engine: Engine) -> None:
    store = EmailStore(db_engine)
    document = {"trace_id": "t", "source": documents.source("ann"),
                "envelope": documents.parsed()["envelope"], "email": documents.email(),
                "deliveries": [{"principal_kind": "user", "principal": "ann",
                                "address": "ann@corp.example", "mailbox": "ann",
                                "method": "direct"}]}
    codec = Codec()
    [result] = store.save([codec.decode("routed", codec.encode("routed", document))])
    row = email_row(store, result.email_id)
    assert (row["tracked"], row["correlation_method"], row["thread_id"]) == (
        True, "none", result.email_id)


@pytest.mark.parametrize("order", [("ann", "support"), ("support", "ann")])
def test_one_email_to_a_user_and_the_queue_in_one_batch(db_engine: Engine,
                                                        order: tuple[str, str]) -> None:
    run = Pipeline(db_engine, config())
    raw = mail("both@c", to="ann@corp.example", headers={"Cc": "support@corp.example"})
    email_id, same = run.save(*(run.route(raw, mailbox) for mailbox in order))
    assert email_id == same
    deliveries = {d["principal"]: d["rule"] for d in run.store.deliveries_for(email_id)}
    assert deliveries == {"ann": None, "support": "support case"}
    [item] = run.store.queue_items_for(email_id)
    assert (item["queue"], item["rule"], item["priority"]) == (
        "support", "support case", "normal")
    [case] = run.store.cases_for(email_id)
    assert case["rule"] == "support case"
    row = email_row(run.store, email_id)
    assert row["rule"] == "support case"
    resolution = {p["address"]: p["resolution"]
                  for p in run.store.resolved_parties_for(email_id)}
    assert resolution == {"carol@customer.example": "contact", "ann@corp.example": "user",
                          "support@corp.example": "queue"}


def test_party_lookups_are_cached_for_a_while(db_engine: Engine) -> None:
    now = [0.0]
    history = SqlHistory(db_engine, party_cache_seconds=30, clock=lambda: now[0])
    assert history.party("gil@new.example") is None
    DirectoryStore(db_engine).add_contact("Gil", ["gil@new.example"])
    assert history.party("gil@new.example") is None  # still the cached answer
    now[0] = 31.0
    match = history.party("gil@new.example")
    assert match is not None and (match.kind, match.name) == ("contact", "Gil")
