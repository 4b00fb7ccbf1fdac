// What a Java application does through pgjdbc (Debian's libpostgresql-jdbc-java), run once
// against a PostgreSQL server and once through Chorus; proxy/tests/jdbc.rs compares the two
// outputs line by line. Each case prints "name: result" or "name: FAILED <SQLSTATE> <message>".
//
//   java -cp /usr/share/java/postgresql.jar:DIR ChorusJdbc 'jdbc:postgresql://127.0.0.1:PORT/postgres' USER PASSWORD

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.*;
import java.util.*;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class ChorusJdbc {
    static String url, user, password;

    interface Case { String run() throws Exception; }

    public static void main(String[] args) throws Exception {
        url = args[0];
        user = args[1];
        password = args[2];
        try (Connection c = connect("")) {
            try (Statement s = c.createStatement()) {
                s.execute("DROP TABLE IF EXISTS jb, jcopy, jkeys");
                s.execute("CREATE TABLE jb (id int PRIMARY KEY, v text)");
                s.execute("CREATE TABLE jcopy (id int, label text)");
                s.execute("CREATE TABLE jkeys (id serial PRIMARY KEY, v text)");
            }
        }
        run("prepared_past_the_threshold", ChorusJdbc::prepared);
        run("batch", () -> batch("", 0));
        run("batch_rewritten", () -> batch("&reWriteBatchedInserts=true", 1000));
        run("batch_error_in_a_transaction", ChorusJdbc::batchError);
        run("batch_returning_keys", ChorusJdbc::batchKeys);
        run("binary_transfer", ChorusJdbc::binary);
        run("copy_manager", ChorusJdbc::copy);
        run("notifications", ChorusJdbc::notifications);
        run("cancel", ChorusJdbc::cancel);
        run("rollback", ChorusJdbc::rollback);
        run("generated_keys", ChorusJdbc::generatedKeys);
        run("error_then_go_on", ChorusJdbc::errorThenGoOn);
    }

    static Connection connect(String extra) throws SQLException {
        String sep = url.contains("?") ? "&" : "?";
        return DriverManager.getConnection(url + (extra.isEmpty() ? "" : sep + extra.substring(1)), user, password);
    }

    static void run(String name, Case c) {
        String out;
        try {
            out = c.run();
        } catch (SQLException e) {
            out = "FAILED " + e.getSQLState() + " " + e.getMessage();
        } catch (Exception e) {
            out = "FAILED " + e;
        }
        System.out.println(name + ": " + out);
    }

    // Server-side prepared statements start after prepareThreshold (5) executions.
    static String prepared() throws SQLException {
        try (Connection c = connect(""); PreparedStatement p = c.prepareStatement("SELECT ?::int * 2, ?::text")) {
            long sum = 0;
            StringBuilder texts = new StringBuilder();
            for (int i = 1; i <= 12; i++) {
                p.setInt(1, i);
                p.setString(2, "t" + i);
                try (ResultSet r = p.executeQuery()) {
                    r.next();
                    sum += r.getInt(1);
                    if (i % 4 == 0) texts.append(r.getString(2));
                }
            }
            return "sum=" + sum + " texts=" + texts;
        }
    }

    static String batch(String extra, int base) throws SQLException {
        try (Connection c = connect(extra); PreparedStatement p = c.prepareStatement("INSERT INTO jb (id, v) VALUES (?, ?)")) {
            for (int i = 1; i <= 200; i++) {
                p.setInt(1, base + i);
                p.setString(2, "v" + i);
                p.addBatch();
            }
            int[] counts = p.executeBatch();
            long total = 0;
            for (int n : counts) total += (n == Statement.SUCCESS_NO_INFO ? 1 : n);
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("SELECT count(*), sum(id) FROM jb WHERE id > " + base + " AND id <= " + (base + 200))) {
                r.next();
                return "batches=" + counts.length + " rows=" + total + " count=" + r.getLong(1) + " sum=" + r.getLong(2);
            }
        }
    }

    // A batch whose 100th row breaks a key, in a transaction: the error, and nothing of it after
    // the rollback (a pipeline's error aborts what PostgreSQL aborts).
    static String batchError() throws SQLException {
        try (Connection c = connect("")) {
            c.setAutoCommit(false);
            String out;
            try (PreparedStatement p = c.prepareStatement("INSERT INTO jb (id, v) VALUES (?, ?)")) {
                for (int i = 1; i <= 200; i++) {
                    p.setInt(1, i == 100 ? 5001 : 5000 + i);
                    p.setString(2, "e" + i);
                    p.addBatch();
                }
                p.executeBatch();
                out = "no error";
            } catch (BatchUpdateException e) {
                out = "sqlstate=" + e.getSQLState();
            }
            c.rollback();
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("SELECT count(*) FROM jb WHERE id > 5000")) {
                r.next();
                out += " left=" + r.getLong(1);
            }
            c.commit();
            return out;
        }
    }

    // A batch of INSERT ... RETURNING (generated keys): every key, in order.
    static String batchKeys() throws SQLException {
        try (Connection c = connect("");
             PreparedStatement p = c.prepareStatement("INSERT INTO jkeys (v) VALUES (?)", Statement.RETURN_GENERATED_KEYS)) {
            for (int i = 0; i < 50; i++) {
                p.setString(1, "b" + i);
                p.addBatch();
            }
            p.executeBatch();
            long n = 0, sum = 0;
            try (ResultSet k = p.getGeneratedKeys()) {
                while (k.next()) {
                    n++;
                    sum += k.getLong(1);
                }
            }
            return "keys=" + n + " sum=" + sum;
        }
    }

    static String binary() throws SQLException {
        try (Connection c = connect("&prepareThreshold=1&binaryTransfer=true");
             PreparedStatement p = c.prepareStatement("SELECT ?::bytea, ?::float8, ?::int8, ?::numeric, ?::date")) {
            StringBuilder out = new StringBuilder();
            for (int i = 0; i < 3; i++) {
                p.setBytes(1, new byte[] {1, 2, (byte) (250 + i)});
                p.setDouble(2, 1.5 + i);
                p.setLong(3, 9_000_000_000L + i);
                p.setBigDecimal(4, new java.math.BigDecimal("12.345" + i));
                p.setDate(5, java.sql.Date.valueOf("2024-02-2" + i));
                try (ResultSet r = p.executeQuery()) {
                    r.next();
                    out.append(Arrays.toString(r.getBytes(1))).append(r.getDouble(2)).append(' ').append(r.getLong(3))
                        .append(' ').append(r.getBigDecimal(4)).append(' ').append(r.getDate(5)).append(';');
                }
            }
            return out.toString();
        }
    }

    static String copy() throws Exception {
        try (Connection c = connect("")) {
            CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder data = new StringBuilder();
            for (int i = 1; i <= 1000; i++) data.append(i).append('\t').append("label ").append(i).append('\n');
            long in = cm.copyIn("COPY jcopy FROM STDIN", new StringReader(data.toString()));
            StringWriter w = new StringWriter();
            long out = cm.copyOut("COPY (SELECT * FROM jcopy ORDER BY id) TO STDOUT", w);
            return "in=" + in + " out=" + out + " same=" + w.toString().equals(data.toString());
        }
    }

    static String notifications() throws Exception {
        try (Connection listener = connect(""); Connection notifier = connect("")) {
            try (Statement s = listener.createStatement()) {
                s.execute("LISTEN jch");
            }
            try (Statement s = notifier.createStatement()) {
                for (int i = 0; i < 3; i++) s.execute("NOTIFY jch, 'n" + i + "'");
            }
            List<String> got = new ArrayList<>();
            long deadline = System.currentTimeMillis() + 10_000;
            while (got.size() < 3 && System.currentTimeMillis() < deadline) {
                PGNotification[] ns = listener.unwrap(PGConnection.class).getNotifications(1000);
                if (ns != null) for (PGNotification n : ns) got.add(n.getName() + "/" + n.getParameter());
            }
            return String.join(",", got);
        }
    }

    static String cancel() throws Exception {
        try (Connection c = connect(""); Statement s = c.createStatement()) {
            Thread t = new Thread(() -> {
                try {
                    Thread.sleep(500);
                    s.cancel();
                } catch (Exception e) {
                    System.out.println("cancel thread: " + e);
                }
            });
            t.start();
            String out;
            try {
                s.execute("SELECT pg_sleep(30)");
                out = "not cancelled";
            } catch (SQLException e) {
                out = "sqlstate=" + e.getSQLState();
            }
            t.join();
            try (ResultSet r = s.executeQuery("SELECT 1")) {
                r.next();
                return out + " then=" + r.getInt(1);
            }
        }
    }

    static String rollback() throws SQLException {
        try (Connection c = connect("")) {
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.executeUpdate("INSERT INTO jb VALUES (5000, 'gone')");
                c.rollback();
                s.executeUpdate("INSERT INTO jb VALUES (5001, 'kept')");
                c.commit();
                try (ResultSet r = s.executeQuery("SELECT string_agg(v, ',' ORDER BY id) FROM jb WHERE id >= 5000")) {
                    r.next();
                    return r.getString(1);
                }
            }
        }
    }

    static String generatedKeys() throws SQLException {
        try (Connection c = connect("");
             PreparedStatement p = c.prepareStatement("INSERT INTO jkeys (v) VALUES (?)", Statement.RETURN_GENERATED_KEYS)) {
            StringBuilder keys = new StringBuilder();
            for (int i = 0; i < 3; i++) {
                p.setString(1, "k" + i);
                p.executeUpdate();
                try (ResultSet r = p.getGeneratedKeys()) {
                    r.next();
                    keys.append(r.getInt(1)).append(' ');
                }
            }
            return keys.toString().trim();
        }
    }

    static String errorThenGoOn() throws SQLException {
        try (Connection c = connect(""); Statement s = c.createStatement()) {
            String first;
            try {
                s.executeUpdate("INSERT INTO jb VALUES (1, 'duplicate')");
                first = "no error";
            } catch (SQLException e) {
                first = e.getSQLState();
            }
            try (ResultSet r = s.executeQuery("SELECT count(*) FROM jb")) {
                r.next();
                return first + " count=" + r.getLong(1);
            }
        }
    }
}
