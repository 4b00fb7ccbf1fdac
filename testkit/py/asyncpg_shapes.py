"""The pipelines asyncpg sends (executemany: Bind and Execute for every row, one Sync), run with
asyncpg from PyPI as the client. Prints one JSON object, scenario -> what the client saw; the
Rust test runs it against a direct server and through Chorus and compares the two.

Usage: asyncpg_shapes.py DSN
"""

import asyncio
import json
import sys

import asyncpg


async def scenario(results, name, coro):
    try:
        results[name] = await asyncio.wait_for(coro, 30)
    except asyncio.TimeoutError:
        results[name] = "hang"
    except asyncpg.PostgresError as x:
        results[name] = {"error": x.sqlstate}


async def main(dsn):
    conn = await asyncpg.connect(dsn)
    await conn.execute("DROP TABLE IF EXISTS ap; CREATE TABLE ap (id int PRIMARY KEY, v text, at timestamptz DEFAULT now())")
    results = {}

    async def autocommit_many():
        await conn.executemany("INSERT INTO ap (id, v) VALUES ($1, $2)", [(i, f"v{i}") for i in range(1, 201)])
        return list(await conn.fetchrow("SELECT count(*), sum(id) FROM ap"))

    async def many_in_a_transaction():
        async with conn.transaction():
            await conn.executemany("INSERT INTO ap (id, v) VALUES ($1, $2)", [(i, "t") for i in range(1001, 1101)])
            inside = await conn.fetchval("SELECT count(*) FROM ap WHERE v = 't'")
        return [inside, await conn.fetchval("SELECT count(*) FROM ap WHERE v = 't'")]

    async def error_in_the_middle():
        # asyncpg's executemany is atomic: a broken key in row 50 leaves none of the 100.
        rows = [(2000 + i, "e") for i in range(100)]
        rows[50] = (2000, "e")
        try:
            await conn.executemany("INSERT INTO ap (id, v) VALUES ($1, $2)", rows)
            seen = "no error"
        except asyncpg.PostgresError as x:
            seen = x.sqlstate
        return [seen, await conn.fetchval("SELECT count(*) FROM ap WHERE v = 'e'")]

    async def cached_statements():
        # The statement cache: the same query prepared once, run many times.
        total = 0
        for i in range(1, 51):
            total += await conn.fetchval("SELECT id FROM ap WHERE id = $1", i)
        return total

    async def update_returning_many():
        out = await conn.fetch("UPDATE ap SET v = v || '!' WHERE id <= 5 RETURNING id, v")
        return sorted([r["id"], r["v"]] for r in out)

    await scenario(results, "autocommit_many", autocommit_many())
    await scenario(results, "many_in_a_transaction", many_in_a_transaction())
    await scenario(results, "error_in_the_middle", error_in_the_middle())
    await scenario(results, "cached_statements", cached_statements())
    await scenario(results, "update_returning_many", update_returning_many())
    await conn.close()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
