"""A channel group and a small workflow: broadcast, side effects, forward and pipe."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from spawnmesh import ActorFailed, ActorSystem, Context, Kind, Reply, action, open_node

system = ActorSystem("news")


@dataclass
class Draft:
    """A story as submitted."""

    title: str
    body: str = ""


@dataclass
class Article:
    """A story as published."""

    headline: str
    words: int = 0


@dataclass
class Headlines:
    """A subscriber's state: the headlines it received."""

    seen: list[str] = field(default_factory=list)


@dataclass
class Stats:
    """Publication count and who reported last."""

    published: int = 0
    reported_by: str | None = None


@dataclass
class Desk:
    """The desk's own bookkeeping."""

    submitted: int = 0
    published: int = 0


# --8<-- [start:subscribers]
@system.actor("archive", state=Headlines, channels={"news": "store"})
class Archive:
    """A named subscriber: channel ``news`` is delivered to its ``store`` action."""

    @action
    async def store(self, ctx: Context[Headlines], article: Article) -> None:
        """Keep every headline."""
        ctx.state.seen.append(article.headline)


@system.actor("reader", kind=Kind.UNNAMED, state=Headlines, channels=["news"])
class Reader:
    """Unnamed subscribers: each *active* instance gets ``news`` on ``receive``."""

    @action
    async def receive(self, ctx: Context[Headlines], article: Article) -> None:
        """The default action for channels given as a list."""
        ctx.state.seen.append(article.headline)

    @action
    async def open(self, ctx: Context[Headlines]) -> None:
        """Activate this reader so it starts receiving."""
# --8<-- [end:subscribers]


# --8<-- [start:workflow]
@system.actor("desk", state=Desk)
class DeskActor:
    """Takes drafts and publishes what the moderator approves."""

    @action
    async def submit(self, ctx: Context[Desk], draft: Draft) -> Reply:
        """Count the draft, then forward the same draft to the moderator."""
        ctx.state.submitted += 1
        return ctx.reply().forward(ctx.ref("moderator"), "review")

    @action
    async def publish(self, ctx: Context[Desk], article: Article) -> Reply:
        """Publish: broadcast to the channel and tell stats, after this turn commits."""
        ctx.state.published += 1
        return (
            ctx.reply(f"published: {article.headline}")
            .broadcast("news", article)
            .effect(ctx.ref("stats"), "bump", 1)
        )


@system.actor("moderator", stateful=False)
class Moderator:
    """Turns a draft into an article and pipes it on to the desk."""

    @action
    async def review(self, ctx: Context[None], draft: Draft) -> Reply:
        """Reject empty titles; pipe the article (this turn's output) to ``desk.publish``."""
        if not draft.title.strip():
            raise ValueError("a draft needs a title")
        article = Article(draft.title.strip().upper(), len(draft.body.split()))
        return ctx.reply(article).pipe(ctx.ref("desk"), "publish")


@system.actor("stats", state=Stats)
class StatsActor:
    """The target of a side effect: the caller is the actor that produced it."""

    @action
    async def bump(self, ctx: Context[Stats], n: int) -> None:
        """Count publications."""
        ctx.state.published += n
        ctx.state.reported_by = str(ctx.caller)
# --8<-- [end:workflow]


async def main() -> None:
    """Publish a story through the workflow and show who received what."""
    async with open_node(None, system) as node:
        # --8<-- [start:run]
        readers = [node.ref("news", f"reader-{i}", parent="reader") for i in (1, 2)]
        for r in readers:
            await r.invoke("open")

        desk = node.ref("news", "desk")
        print(await desk.invoke("submit", Draft("  spawnmesh ships  ", "virtual actors on trio")))
        try:
            await desk.invoke("submit", Draft("   "))
        except ActorFailed as exc:
            print("moderator rejected:", exc.error_message)

        await trio.sleep(0.05)  # broadcasts and side effects are delivered asynchronously
        print("archive:", (await node.ref("news", "archive").get_state()).seen)
        for r in readers:
            print(f"{r.id.name}:", (await r.get_state()).seen)
        print("stats:", await node.ref("news", "stats").get_state())
        print("desk:", await desk.get_state())

        delivered = await node.broadcast("news", "news", Article("FROM OUTSIDE"))
        print("broadcast from outside, deliveries:", delivered)
        await trio.sleep(0.05)
        print("archive:", (await node.ref("news", "archive").get_state()).seen)
        late = node.ref("news", "reader-3", parent="reader")
        print("inactive reader-3 saw:", (await late.get_state()).seen)
        # --8<-- [end:run]


if __name__ == "__main__":
    trio.run(main)
